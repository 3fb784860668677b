"""The convolution the models use: XLA's, with compiled kernels where XLA:CPU is slow.

`conv_general_dilated` is a drop-in for `lax.conv_general_dilated` (flax's
`nn.Conv(..., conv_general_dilated=...)`). On GPUs and TPUs it is XLA's convolution. On a CPU
its forward, input gradient and kernel gradient are routed by shape (`routes`) to the
compiled kernels of `skinmtl_jax.kernels` (kernels/conv2d.cc):
- 'winograd': 3x3 stride-1 convolutions with at least MIN_WINOGRAD_PIXELS output pixels per
  image, all three parts, by Winograd's F(2x2, 3x3) (2.25x fewer multiplications) and its
  adjoint F(3x3, 2x2) for the kernel gradient. The input gradient of a stride-1 convolution
  is a stride-1 convolution of the output gradient with the flipped kernel.
- 'gemm': GEMMs over gathered windows (im2col), for strided convolutions, for windows of at
  most SHORT_WINDOW values (kh*kw*channels: the RGB layer, the 1x1 head) and for every other
  kernel gradient. XLA:CPU writes a kernel gradient as a convolution with a window as large
  as the feature map, at up to 9.5x the forward's cost.
- 'xla': the rest (long windows on small feature maps), where XLA's YNNPACK convolutions run
  at the GEMM's rate.
`benchmarks/conv_layers.py` measures each choice per layer (benchmarks/RESULTS.md). The values
are the same up to float32 rounding (tests/test_conv.py checks against `jax.grad` of the plain
convolution at 1e-5; Winograd's differ from XLA's by about 1e-6 relative).

bfloat16 convolutions (`model.dtype='bfloat16'`) take the same routes on the float32 values of
their operands (exact: a product of two bfloat16 values is exact in float32, and XLA too
accumulates in float32), the result rounded to bfloat16. On CPUs with AMX-BF16
(`kernels.amx_available()`) their forwards and stride-1 input and kernel gradients take 'amx'
instead: `kernels.conv2d_bf16` and `kernels.conv2d_bf16_weight_grad`, on the tile unit, up to
9x (forward, input gradient) and 2-4x (kernel gradient) faster than our float32 kernels
(benchmarks/RESULTS.md). The U-Net's convolutions pass their float32 kernels
(`promote_keep_params`): each route rounds them to bfloat16 itself, the AMX kernel while it
packs them, which saves XLA a separate conversion of every kernel per call.

Covered: float32 and bfloat16, 2-D NHWC/HWIO, no dilation or groups (every convolution of the
U-Net family, the RGB input layer's too). Everything else is `lax.conv_general_dilated`
unchanged.
`upconv2x2` is the decoder's 2x2 stride-2 up-convolution with our kernels as its gradients.
`conv_impl='xla'` (the config's `model.conv_impl`) keeps XLA's everywhere.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp

from flax.linen.dtypes import promote_dtype

from skinmtl_jax import kernels
from skinmtl_jax.config_base import CONV_IMPLS

_NHWC = ('NHWC', 'HWIO', 'NHWC')
# On a CPU, 3x3 stride-1 convolutions with at least this many output pixels per image take
# Winograd's algorithm; other convolutions take our GEMM kernels when strided or when their
# window holds at most SHORT_WINDOW values (kh*kw*channels), else XLA's. See above.
MIN_WINOGRAD_PIXELS = 128
SHORT_WINDOW = 288

Pads = tuple[tuple[int, int], tuple[int, int]]


def _plain(x, kernel, strides, pads):
  return _xla(x, kernel, strides, pads, dimension_numbers=_NHWC)


def routes(kernel_shape, strides, in_hw, out_hw, dtype=jnp.float32,
           amx: bool | None = None) -> dict[str, str]:
  """How the forward, input gradient and kernel gradient are computed on a CPU: 'winograd'
  (`kernels.winograd_conv3x3`), 'gemm' (the other kernels of `skinmtl_jax.kernels`), 'amx'
  (`kernels.conv2d_bf16`, `kernels.conv2d_bf16_weight_grad`: bfloat16 only, where `amx`, by
  default `kernels.amx_available()`) or 'xla'.

  The input gradient of a stride-1 convolution is a stride-1 convolution of the output
  gradient with the flipped kernel, so it routes like a forward from out_hw to in_hw.
  """
  kh, kw, cin, cout = kernel_shape
  strided = tuple(strides) != (1, 1)

  winograd = lambda pixels: ((kh, kw) == (3, 3) and not strided
                             and pixels >= MIN_WINOGRAD_PIXELS)

  if amx is None:
    amx = kernels.amx_available()
  amx = amx and jnp.dtype(dtype) == jnp.bfloat16

  def conv(channels, out_pixels, can_amx=True):
    if amx and can_amx:
      return 'amx'
    if winograd(out_pixels):
      return 'winograd'
    return 'gemm' if strided or kh * kw * channels <= SHORT_WINDOW else 'xla'
  if amx and not strided:
    kernel_grad = 'amx'
  else:
    kernel_grad = 'winograd' if winograd(out_hw[0] * out_hw[1]) else 'gemm'
  return {'forward': conv(cin, out_hw[0] * out_hw[1]),
          'input_grad': conv(cout, in_hw[0] * in_hw[1], can_amx=not strided),
          'kernel_grad': kernel_grad}


def _pvary(out, axes):
  if not axes:
    return out
  axes = tuple(sorted(axes))
  if hasattr(lax, 'pcast'):
    return lax.pcast(out, axes, to='varying')
  return lax.pvary(out, axes)  # jax < 0.8


def _varying_axes(a) -> frozenset:
  aval = jax.typeof(a)
  mat = getattr(aval, 'mat', None)     # jax >= 0.10: the manual axis types
  return frozenset(mat.varying if mat is not None else getattr(aval, 'vma', ()))


def _result_axes(leaf) -> frozenset:
  """The mesh axes an abstract result (`jax.eval_shape`'s) varies over."""
  mat = getattr(leaf, 'manual_axis_type', None)  # jax >= 0.10
  return frozenset(mat.varying if mat is not None else (getattr(leaf, 'vma', None) or ()))


def _typed_like(out, args, expected: frozenset):
  """An FFI result computed from `args` inside shard_map, typed as XLA's would be: an FFI call
  carries no varying type, so it is first marked varying over every axis its arguments vary
  over (what it is), then summed over the axes XLA's result does not vary over (what the
  gradient of an argument that is the same on every device is: the sum of the devices')."""
  inputs = frozenset().union(*(_varying_axes(a) for a in args))
  out = _pvary(out, inputs)
  if inputs - expected:
    out = lax.psum(out, tuple(sorted(inputs - expected)))
  return _pvary(out, expected - inputs)


def _on_cpu(ours, xla, *args):
  """`ours(*args)` on a CPU, `xla(*args)` elsewhere, with the same types inside shard_map;
  each platform lowers only its own branch (the kernels are registered for the CPU alone)."""
  def cpu(*a):
    expected = jax.tree.map(_result_axes, jax.eval_shape(xla, *a))
    return jax.tree.map(lambda out, axes: _typed_like(out, a, axes), ours(*a), expected)
  return lax.platform_dependent(*args, cpu=cpu, default=xla)


def _in_float32(kernel_fn, *operands):
  """`kernel_fn` (a float32 kernel) on the float32 values of the operands rounded to the first
  one's dtype (bfloat16 or float32), the result in that dtype."""
  dtype = operands[0].dtype
  return kernel_fn(*(a.astype(dtype).astype(jnp.float32) for a in operands)).astype(dtype)


def _forward(route, x, kernel, strides, lead, out_hw):
  """The convolution by our kernels, as `route` says."""
  if route == 'amx':
    return kernels.conv2d_bf16(x, kernel, strides, lead, out_hw)
  if route == 'winograd':
    return _in_float32(lambda x, k: kernels.winograd_conv3x3(x, k, lead, out_hw), x, kernel)
  return _in_float32(lambda x, k: kernels.conv2d(x, k, strides, lead, out_hw), x, kernel)


def _input_grad(route, g, kernel, strides, lead, in_hw):
  """The input gradient by our kernels. Stride 1: the convolution of g with the kernel flipped
  and transposed (a gather, parallel over blocks of pixels); strided:
  `kernels.conv2d_input_grad` (col2im)."""
  kh, kw = kernel.shape[:2]
  if tuple(strides) == (1, 1):
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    return _forward(route, g, flipped, (1, 1), (kh - 1 - lead[0], kw - 1 - lead[1]), in_hw)
  return _in_float32(lambda g, k: kernels.conv2d_input_grad(g, k, strides, lead, in_hw),
                     g, kernel)


def _routes(x, kernel, strides, pads):
  out_hw = jax.eval_shape(lambda x, k: _plain(x, k, strides, pads), x, kernel).shape[1:3]
  return routes(kernel.shape, strides, x.shape[1:3], out_hw, x.dtype), out_hw


def promote_keep_params(*args, dtype=None, inexact=True):
  """flax's `promote_dtype` for `nn.Conv(..., promote_dtype=...)` with our
  `conv_general_dilated`: the input in `dtype`, the kernel and the bias left in float32. The
  convolution rounds the kernel to the input's dtype itself; the bias is added in float32 (the
  output is then float32: for the BatchNorm that follows, which computes in float32 anyway),
  so that its gradient is a float32 sum. XLA:CPU splits sums of bfloat16 values into
  reduce-windows that took 0.5 s of a 2.5 s bfloat16 unet step."""
  x = promote_dtype(args[0], dtype=dtype, inexact=inexact)[0]
  return (x, *args[1:]) if dtype is not None else promote_dtype(*args, inexact=inexact)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, strides, pads):
  route, out_hw = _routes(x, kernel, strides, pads)
  if route['forward'] == 'xla':
    return _plain(x, kernel, strides, pads)
  lead = (pads[0][0], pads[1][0])
  return _on_cpu(
      functools.partial(_forward, route['forward'], strides=strides, lead=lead, out_hw=out_hw),
      lambda x, k: _plain(x, k, strides, pads), x, kernel)


def _conv_fwd(x, kernel, strides, pads):
  return _conv(x, kernel, strides, pads), (x, kernel)


def _conv_bwd(strides, pads, residuals, g):
  x, kernel = residuals
  lead = (pads[0][0], pads[1][0])
  route, _ = _routes(x, kernel, strides, pads)
  xla_dx = lambda g, k: jax.vjp(lambda x: _plain(x, k, strides, pads), x)[1](g)[0]
  # Input gradients by our kernels take g's dtype: with a float32 kernel (promote_keep_params)
  # that of the bfloat16 input.
  if route['input_grad'] == 'xla':
    dx = xla_dx(g, kernel)
  else:
    dx = _on_cpu(functools.partial(_input_grad, route['input_grad'], strides=strides,
                                   lead=lead, in_hw=x.shape[1:3]), xla_dx, g, kernel)
  if route['kernel_grad'] == 'amx':  # bfloat16 x and g; a float32 result, rounded as XLA's
    ours_dk = lambda x, g: kernels.conv2d_bf16_weight_grad(
        x, g, lead, kernel.shape[:2]).astype(x.dtype).astype(kernel.dtype)
  else:
    if route['kernel_grad'] == 'winograd':
      dk_fn = lambda x, g: kernels.winograd_conv3x3_weight_grad(x, g, lead)
    else:
      dk_fn = lambda x, g: kernels.conv2d_weight_grad(x, g, strides, lead, kernel.shape[:2])
    ours_dk = lambda x, g: _in_float32(dk_fn, x, g).astype(kernel.dtype)
  dk = _on_cpu(ours_dk,
               lambda x, g: jax.vjp(lambda k: _plain(x, k, strides, pads), kernel)[1](g)[0],
               x, g)
  return dx, dk


_conv.defvjp(_conv_fwd, _conv_bwd)


def _covered(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
             batch_group_count, precision, preferred_element_type) -> bool:
  ones = lambda d: d is None or all(v == 1 for v in d)
  if not (lhs.ndim == 4 and lhs.dtype in (jnp.float32, jnp.bfloat16)
          and rhs.dtype in (lhs.dtype, jnp.float32)
          and ones(lhs_dilation) and ones(rhs_dilation) and feature_group_count == 1
          and batch_group_count == 1 and precision is None and preferred_element_type is None
          and dimension_numbers is not None):
    return False
  return (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`, with the CPU kernels where they are covered. A float32 kernel
  with a bfloat16 input (`promote_keep_params`) is rounded to bfloat16."""
  if kernels.available() and _covered(
      lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
      batch_group_count, precision, preferred_element_type):
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    pads = tuple(tuple(int(v) for v in p) for p in padding)
    return _conv(lhs, rhs, tuple(int(s) for s in window_strides), pads)
  return _xla(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
              dimension_numbers, feature_group_count, batch_group_count, precision,
              preferred_element_type)


def _xla(lhs, rhs, *args, **kwargs):
  """`lax.conv_general_dilated`, the kernel rounded to a bfloat16 input's dtype first
  (`promote_keep_params` leaves it float32)."""
  if lhs.dtype == jnp.bfloat16 and rhs.dtype == jnp.float32:
    rhs = rhs.astype(lhs.dtype)
  return lax.conv_general_dilated(lhs, rhs, *args, **kwargs)


def _upconv_einsum(x, kernel):
  b, h, w, _ = x.shape
  y = jnp.einsum('bhwi,acio->bhawco', x, kernel[::-1, ::-1])
  return y.reshape(b, 2 * h, 2 * w, kernel.shape[-1])


def _upconv_as_transpose(kernel):
  """The kernel of the strided convolution whose transpose the up-convolution is:
  out[2i + a, 2j + c] = x[i, j] @ kernel[1 - a, 1 - c] is the input gradient of a 2x2 stride-2
  convolution with kernel w[a, c] = kernel[1 - a, 1 - c]^T."""
  return jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)


@jax.custom_vjp
def _upconv(x, kernel):
  return _upconv_einsum(x, kernel)  # XLA's matmul: as fast as ours, faster at batch 1


def _upconv_fwd(x, kernel):
  return _upconv(x, kernel), (x, kernel)


def _upconv_bwd(residuals, g):
  x, kernel = residuals

  def ours(x, kernel, g):
    w = _upconv_as_transpose(kernel)
    route = routes(w.shape, (2, 2), g.shape[1:3], x.shape[1:3], g.dtype)['forward']
    dx = _forward(route, g, w, (2, 2), (0, 0), x.shape[1:3])
    dw = _in_float32(lambda g, x: kernels.conv2d_weight_grad(g, x, (2, 2), (0, 0), (2, 2)),
                     g, x)
    return dx, jnp.flip(dw.transpose(0, 1, 3, 2), (0, 1)).astype(kernel.dtype)

  def xla(x, kernel, g):
    return jax.vjp(_upconv_einsum, x, kernel)[1](g)
  return _on_cpu(ours, xla, x, kernel, g)


_upconv.defvjp(_upconv_fwd, _upconv_bwd)


def upconv2x2(x, kernel, conv_impl: str = 'auto'):
  """`nn.ConvTranspose(features, (2, 2), strides=(2, 2))` without its bias: out[2i + a, 2j + c]
  = x[i, j] @ kernel[1 - a, 1 - c], one matmul and a depth-to-space. On a CPU
  (`conv_impl='auto'`, float32) its gradients are our kernels, as those of the 2x2 stride-2
  convolution whose transpose it is: they need no transposed copies (XLA:CPU spent 0.2 s of a
  unet step on them). bfloat16 likewise (`conv_general_dilated`)."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'model.conv_impl={conv_impl!r}: expected one of {CONV_IMPLS}.')
  if (conv_impl == 'auto' and kernels.available() and x.dtype in (jnp.float32, jnp.bfloat16)
      and kernel.dtype == x.dtype):
    return _upconv(x, kernel)
  return _upconv_einsum(x, kernel)


def for_impl(conv_impl: str):
  """The `conv_general_dilated` for `nn.Conv` under `model.conv_impl`."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'model.conv_impl={conv_impl!r}: expected one of {CONV_IMPLS}.')
  return conv_general_dilated if conv_impl == 'auto' else _xla
