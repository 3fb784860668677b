"""The convolution the models compute with, chosen once, on the host, when a model is created.

The U-Net's modules take one function, `conv_general_dilated` (the signature of
`lax.conv_general_dilated`, as flax's `nn.Conv` does), and never ask where they run. `select`
picks it from `model.conv_impl`, the platform and whether the CPU kernels loaded:
- `xla_conv_general_dilated`: XLA's convolution. On GPUs and TPUs, with `conv_impl='xla'`, and
  where the kernels are not built (with a one-line log saying why).
- `kernels.KernelConvolution(xla_conv_general_dilated, amx)` (`conv_impl='auto'`, the default,
  on a CPU): our compiled kernels where they cover the convolution and are faster than XLA:CPU,
  XLA's elsewhere (skinmtl_jax/kernels/routing.py says which). The values are the same up to
  float32 rounding; a model on a GPU never traces a call of them.

`upconv2x2` is the decoder's up-convolution written as that function's call, and
`promote_keep_params` the dtype policy of the U-Net's convolutions in mixed precision.
"""

from __future__ import annotations

from collections.abc import Callable
import functools

from absl import logging
from flax.linen.dtypes import promote_dtype
import jax
from jax import lax
import jax.numpy as jnp

from skinmtl_jax import kernels
from skinmtl_jax.config_base import check_choice

NHWC = ('NHWC', 'HWIO', 'NHWC')
# The up-convolution as `lax.conv_general_dilated` arguments: the transpose of a 2x2 stride-2
# convolution, lax.conv_transpose(x, kernel, (2, 2), 'VALID') (the kernel flipped, not
# transposed): out[2i + a, 2j + c] = x[i, j] @ kernel[1 - a, 1 - c].
UPCONV_ARGS = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), lhs_dilation=(2, 2),
                   dimension_numbers=NHWC)


def _upconv_einsum(x, kernel):
  b, h, w, _ = x.shape
  y = jnp.einsum('bhwi,acio->bhawco', x, kernel[::-1, ::-1])
  return y.reshape(b, 2 * h, 2 * w, kernel.shape[-1])


def _is_upconv(rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
               feature_group_count, batch_group_count, precision, preferred_element_type):
  pairs = lambda v: None if v is None or isinstance(v, str) else tuple(map(tuple, v))
  return (rhs.shape[:2] == (2, 2) and dimension_numbers == NHWC
          and tuple(window_strides) == UPCONV_ARGS['window_strides']
          and pairs(padding) == UPCONV_ARGS['padding']
          and lhs_dilation is not None and tuple(lhs_dilation) == UPCONV_ARGS['lhs_dilation']
          and (rhs_dilation is None or all(v == 1 for v in rhs_dilation))
          and feature_group_count == batch_group_count == 1 and precision is None
          and preferred_element_type is None)


def xla_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                             rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                             batch_group_count=1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` as the models use it: a float32 kernel with a bfloat16 input
  (`promote_keep_params`) is rounded to bfloat16 first, and the up-convolution (`upconv2x2`)
  is one matmul and a depth-to-space, the same values: XLA's CPU backend ran the transposed
  convolution's kernel gradient many times slower than the matmul's."""
  if lhs.dtype == jnp.bfloat16 and rhs.dtype == jnp.float32:
    rhs = rhs.astype(lhs.dtype)
  if _is_upconv(rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                feature_group_count, batch_group_count, precision, preferred_element_type):
    return _upconv_einsum(lhs, rhs)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                  rhs_dilation, dimension_numbers, feature_group_count,
                                  batch_group_count, precision, preferred_element_type)


def upconv2x2(conv_general_dilated: Callable, x, kernel):
  """`nn.ConvTranspose(features, (2, 2), strides=(2, 2))` without its bias, by
  `conv_general_dilated` (`select`'s): out[2i + a, 2j + c] = x[i, j] @ kernel[1 - a, 1 - c]."""
  return conv_general_dilated(x, kernel, **UPCONV_ARGS)


@functools.cache
def _say_xla(why: str) -> None:
  logging.warning('CPU convolutions use XLA: the CPU kernels (skinmtl_jax/kernels) are %s',
                  why)


def select(conv_impl: str = 'auto', dtype=jnp.float32,
           platform: str | None = None) -> Callable:
  """The `conv_general_dilated` of a model created now, with `model.conv_impl` = `conv_impl`
  and compute `dtype`, to run on `platform` (by default JAX's default backend): our kernels
  where 'auto' on a CPU where they loaded (AMX for bfloat16 where the CPU has it), else XLA's.
  """
  check_choice('model.conv_impl', conv_impl)  # a caller outside a validated config
  if conv_impl == 'xla' or (platform or jax.default_backend()) != 'cpu':
    return xla_conv_general_dilated
  if not kernels.available():
    _say_xla(kernels.status())
    return xla_conv_general_dilated
  amx = jnp.dtype(dtype) == jnp.bfloat16 and kernels.amx_available()
  return kernels.KernelConvolution(xla_conv_general_dilated, amx)


def promote_keep_params(*args, dtype=None, inexact=True):
  """flax's `promote_dtype` for `nn.Conv(..., promote_dtype=...)` with our
  `conv_general_dilated`: the input in `dtype`, the kernel and the bias left in float32. The
  convolution rounds the kernel to the input's dtype itself; the bias is added in float32 (the
  output is then float32: for the BatchNorm that follows, which computes in float32 anyway),
  so that its gradient is a float32 sum. XLA:CPU splits sums of bfloat16 values into slow
  reduce-windows."""
  x = promote_dtype(args[0], dtype=dtype, inexact=inexact)[0]
  return (x, *args[1:]) if dtype is not None else promote_dtype(*args, inexact=inexact)
