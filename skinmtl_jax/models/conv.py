"""The convolution the models use: XLA's, with a faster weight gradient on CPUs.

`conv_general_dilated` is a drop-in for `lax.conv_general_dilated` (flax's
`nn.Conv(..., conv_general_dilated=...)`). Its forward and input gradient are XLA's. Its kernel
gradient is XLA's on GPUs and TPUs; on the CPU it is the compiled kernel in
`skinmtl_jax.kernels` (one GEMM per kernel tap over the activations in place), which XLA:CPU
lacks: XLA writes that gradient as a convolution with a window as large as the feature map, at
up to 9.5x the forward's cost (benchmarks/RESULTS.md). The values are the same up to float32
summation order (tests/test_conv.py checks against `jax.grad` of the plain convolution).

A strided convolution is first rewritten as a stride-1 one by space-to-depth: with stride s,
input pixel (s*i + a, s*j + b) becomes channel (a, b) of pixel (i, j), and the kernel's taps
regroup the same way, so one kernel serves both.

Covered: float32, 2-D NHWC/HWIO, no dilation or groups, padding not negative (every
convolution of the U-Net family, the RGB input layer's too). Everything else is
`lax.conv_general_dilated` unchanged. `weight_grad='xla'` (the config's
`model.weight_grad`) keeps XLA's everywhere.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp

from skinmtl_jax import kernels
from skinmtl_jax.config_base import WEIGHT_GRADS

_NHWC = ('NHWC', 'HWIO', 'NHWC')

Pads = tuple[tuple[int, int], tuple[int, int]]


def _plain(x, kernel, strides, pads):
  return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_NHWC)


def kernel_grad_by_gemm(x, g, kernel_hw: tuple[int, int], strides: tuple[int, int],
                        pads: Pads) -> jax.Array:
  """The kernel gradient (kh, kw, C, O) with `skinmtl_jax.kernels` (float32; CPU only).

  x: the convolution's input (N, H, W, C); g: its output gradient (N, Ho, Wo, O).
  """
  (kh, kw), (sh, sw) = kernel_hw, strides
  _, ho, wo, _ = g.shape
  cin = x.shape[-1]
  # Pad to what the stride-s windows read, rounded up to whole s x s cells.
  qh, qw = -(-kh // sh), -(-kw // sw)          # taps per axis after space-to-depth
  hp, wp = (ho + qh - 1) * sh, (wo + qw - 1) * sw
  (pt, _), (pl, _) = pads
  # One pad: the leading padding, then zeros or a crop (negative) to exactly hp x wp.
  _, h, w, _ = x.shape
  x = lax.pad(x, jnp.zeros((), x.dtype),
              ((0, 0, 0), (pt, hp - h - pt, 0), (pl, wp - w - pl, 0), (0, 0, 0)))
  if (sh, sw) == (1, 1):
    return kernels.conv_weight_grad(x, g, (kh, kw))
  d = kernels.conv_weight_grad(_space_to_depth(x, sh, sw), g, (qh, qw))
  # d[qy, qx, (a*sw + b)*C + c] is tap (qy*sh + a, qx*sw + b); taps past the kernel are
  # the zero-padding's and are dropped.
  d = d.reshape(qh, qw, sh, sw, cin, -1).transpose(0, 2, 1, 3, 4, 5)
  return d.reshape(qh * sh, qw * sw, cin, -1)[:kh, :kw]


def _space_to_depth(x, sh, sw):
  """(N, sh*H, sw*W, C) -> (N, H, W, sh*sw*C): pixel (sh*i + a, sw*j + b), channel c becomes
  pixel (i, j), channel (a*sw + b)*C + c."""
  n, h, w, c = x.shape
  x = x.reshape(n, h // sh, sh, w // sw, sw, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h // sh, w // sw, sh * sw * c)


def _varying_like(out, *arrays):
  """`out`, marked as varying over the shard_map mesh axes any of `arrays` varies over (as
  XLA's gradient is): the FFI call does not carry that type itself."""
  axes = tuple(sorted(frozenset().union(*(_varying_axes(a) for a in arrays))))
  if not axes:
    return out
  if hasattr(lax, 'pcast'):
    return lax.pcast(out, axes, to='varying')
  return lax.pvary(out, axes)  # jax < 0.8


def _varying_axes(a) -> frozenset:
  aval = jax.typeof(a)
  mat = getattr(aval, 'mat', None)     # jax >= 0.10: the manual axis types
  return frozenset(mat.varying if mat is not None else getattr(aval, 'vma', ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, strides, pads):
  return _plain(x, kernel, strides, pads)


def _conv_fwd(x, kernel, strides, pads):
  return _plain(x, kernel, strides, pads), (x, kernel)


def _conv_bwd(strides, pads, residuals, g):
  x, kernel = residuals
  dx, = jax.vjp(lambda x: _plain(x, kernel, strides, pads), x)[1](g)
  xla = lambda x, g: jax.vjp(lambda k: _plain(x, k, strides, pads), kernel)[1](g)[0]
  gemm = lambda x, g: _varying_like(
      kernel_grad_by_gemm(x, g, kernel.shape[:2], strides, pads), x, g, kernel)
  # Each platform lowers only its own branch: the kernel is registered for the CPU alone.
  dk = lax.platform_dependent(x, g, cpu=gemm, default=xla)
  return dx, dk


_conv.defvjp(_conv_fwd, _conv_bwd)


def _covered(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
             batch_group_count, precision, preferred_element_type) -> bool:
  ones = lambda d: d is None or all(v == 1 for v in d)
  if not (lhs.ndim == 4 and lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32
          and ones(lhs_dilation) and ones(rhs_dilation) and feature_group_count == 1
          and batch_group_count == 1 and precision is None and preferred_element_type is None
          and dimension_numbers is not None):
    return False
  return (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`, with the CPU kernel gradient where it is covered."""
  if kernels.available() and _covered(
      lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
      batch_group_count, precision, preferred_element_type):
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    pads = tuple(tuple(int(v) for v in p) for p in padding)
    if min(min(p) for p in pads) >= 0:
      return _conv(lhs, rhs, tuple(int(s) for s in window_strides), pads)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, batch_group_count, precision, preferred_element_type)


def for_weight_grad(weight_grad: str):
  """The `conv_general_dilated` for `nn.Conv` under `model.weight_grad`."""
  if weight_grad not in WEIGHT_GRADS:
    raise ValueError(f'model.weight_grad={weight_grad!r}: expected one of {WEIGHT_GRADS}.')
  return conv_general_dilated if weight_grad == 'auto' else lax.conv_general_dilated
