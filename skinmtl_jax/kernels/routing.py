"""The convolution with the CPU kernels: which kernel computes which part, routed by shape.

`KernelConvolution(fallback, amx)` is a drop-in for `lax.conv_general_dilated` (flax's
`nn.Conv(..., conv_general_dilated=...)`) for a model that runs on a CPU where the kernels
loaded; `skinmtl_jax.models.conv.select` makes one when a model is created, with the models'
XLA convolution as `fallback`. It computes what it covers with the kernels and hands
everything else, unchanged, to `fallback`. Covered: float32 and bfloat16 2-D NHWC/HWIO
convolutions without dilation or groups (every convolution of the U-Net family, the RGB input
layer's too), and the U-Net's up-convolution (`models.conv.upconv2x2`: the 2x2 stride-2
transposed convolution), whose forward stays `fallback`'s (one matmul) and whose gradients are
the kernels'. Their forward, input gradient and kernel gradient are routed by shape (`routes`):
- 'winograd': 3x3 stride-1 convolutions with at least MIN_WINOGRAD_PIXELS output pixels per
  image, all three parts, by Winograd's F(2x2, 3x3) (2.25x fewer multiplications) and its
  adjoint F(3x3, 2x2) for the kernel gradient. The input gradient of a stride-1 convolution
  is a stride-1 convolution of the output gradient with the flipped kernel.
- 'gemm': GEMMs over gathered windows (im2col), for strided convolutions, for windows of at
  most SHORT_WINDOW values (kh*kw*channels: the RGB layer, the 1x1 head) and for every other
  kernel gradient. XLA:CPU writes a kernel gradient as a convolution with a window as large
  as the feature map, which runs far below the forward's rate (benchmarks/RESULTS.md).
- 'xla': the rest (long windows on small feature maps), where XLA's YNNPACK convolutions run
  at the GEMM's rate: `fallback`'s.
`benchmarks/conv_layers.py` measures each choice per layer (benchmarks/RESULTS.md). The values
are the same up to float32 rounding (tests/test_conv.py checks against `jax.grad` of the plain
convolution at 1e-5; Winograd's differ from XLA's by about 1e-6 relative).

bfloat16 convolutions take the same routes on the float32 values of their operands (exact: a
product of two bfloat16 values is exact in float32, and XLA too accumulates in float32), the
result rounded to bfloat16. With `amx` (decided once, where the model is created: the CPU has
AMX-BF16, `ffi.amx_available()`) their forwards and stride-1 input and kernel gradients take
'amx' instead: `ffi.conv2d_bf16` and `ffi.conv2d_bf16_weight_grad`, on the tile unit, faster
than our float32 kernels (benchmarks/RESULTS.md). A float32 kernel with a bfloat16 input (`models.conv.
promote_keep_params`) is rounded to bfloat16 by each route itself, the AMX kernel while it
packs it.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp

from skinmtl_jax.kernels import ffi

NHWC = ('NHWC', 'HWIO', 'NHWC')
# 3x3 stride-1 convolutions with at least this many output pixels per image take Winograd's
# algorithm; other convolutions take our GEMM kernels when strided or when their window holds
# at most SHORT_WINDOW values (kh*kw*channels), else XLA's. See above.
MIN_WINOGRAD_PIXELS = 128
SHORT_WINDOW = 288

# The up-convolution as `lax.conv_general_dilated` arguments: the transpose of a 2x2 stride-2
# convolution (lax.conv_transpose(x, kernel, (2, 2), 'VALID')).
UPCONV_ARGS = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), lhs_dilation=(2, 2))


def routes(kernel_shape, strides, in_hw, out_hw, dtype=jnp.float32,
           amx: bool = False) -> dict[str, str]:
  """How the forward, input gradient and kernel gradient are computed: 'winograd'
  (`ffi.winograd_conv3x3`), 'gemm' (the other float32 kernels), 'amx' (`ffi.conv2d_bf16`,
  `ffi.conv2d_bf16_weight_grad`: bfloat16 only, and only where `amx`) or 'xla'.

  The input gradient of a stride-1 convolution is a stride-1 convolution of the output
  gradient with the flipped kernel, so it routes like a forward from out_hw to in_hw.
  """
  kh, kw, cin, cout = kernel_shape
  strided = tuple(strides) != (1, 1)

  winograd = lambda pixels: ((kh, kw) == (3, 3) and not strided
                             and pixels >= MIN_WINOGRAD_PIXELS)
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


# ---- FFI results inside shard_map ----

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


def _typed(ours, xla, *args):
  """`ours(*args)` (FFI calls), with the types inside shard_map of `xla(*args)`, the same
  values computed by XLA (only its abstract result is traced)."""
  expected = jax.tree.map(_result_axes, jax.eval_shape(xla, *args))
  return jax.tree.map(lambda out, axes: _typed_like(out, args, axes), ours(*args), expected)


# ---- The three parts by our kernels ----

def _in_float32(kernel_fn, *operands):
  """`kernel_fn` (a float32 kernel) on the float32 values of the operands rounded to the first
  one's dtype (bfloat16 or float32), the result in that dtype."""
  dtype = operands[0].dtype
  return kernel_fn(*(a.astype(dtype).astype(jnp.float32) for a in operands)).astype(dtype)


def _forward(route, x, kernel, strides, lead, out_hw):
  """The convolution by our kernels, as `route` says."""
  if route == 'amx':
    return ffi.conv2d_bf16(x, kernel, strides, lead, out_hw)
  if route == 'winograd':
    return _in_float32(lambda x, k: ffi.winograd_conv3x3(x, k, lead, out_hw), x, kernel)
  return _in_float32(lambda x, k: ffi.conv2d(x, k, strides, lead, out_hw), x, kernel)


def _input_grad(route, g, kernel, strides, lead, in_hw):
  """The input gradient by our kernels. Stride 1: the convolution of g with the kernel flipped
  and transposed (a gather, parallel over blocks of pixels); strided:
  `ffi.conv2d_input_grad` (col2im)."""
  kh, kw = kernel.shape[:2]
  if tuple(strides) == (1, 1):
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    return _forward(route, g, flipped, (1, 1), (kh - 1 - lead[0], kw - 1 - lead[1]), in_hw)
  return _in_float32(lambda g, k: ffi.conv2d_input_grad(g, k, strides, lead, in_hw),
                     g, kernel)


# ---- The convolution and the up-convolution, with their gradients ----

def _plain(backend, x, kernel, strides, pads):
  return backend.fallback(x, kernel, strides, pads, dimension_numbers=NHWC)


def _routes(backend, x, kernel, strides, pads):
  out_hw = jax.eval_shape(lambda x, k: _plain(backend, x, k, strides, pads), x,
                          kernel).shape[1:3]
  return routes(kernel.shape, strides, x.shape[1:3], out_hw, x.dtype, backend.amx), out_hw


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, strides, pads, backend):
  route, out_hw = _routes(backend, x, kernel, strides, pads)
  plain = lambda x, k: _plain(backend, x, k, strides, pads)
  if route['forward'] == 'xla':
    return plain(x, kernel)
  lead = (pads[0][0], pads[1][0])
  return _typed(functools.partial(_forward, route['forward'], strides=strides, lead=lead,
                                  out_hw=out_hw), plain, x, kernel)


def _conv_fwd(x, kernel, strides, pads, backend):
  return _conv(x, kernel, strides, pads, backend), (x, kernel)


def _conv_bwd(strides, pads, backend, residuals, g):
  x, kernel = residuals
  lead = (pads[0][0], pads[1][0])
  route, _ = _routes(backend, x, kernel, strides, pads)
  plain = lambda x, k: _plain(backend, x, k, strides, pads)
  xla_dx = lambda g, k: jax.vjp(lambda x: plain(x, k), x)[1](g)[0]
  # Input gradients by our kernels take g's dtype: with a float32 kernel (promote_keep_params)
  # that of the bfloat16 input.
  if route['input_grad'] == 'xla':
    dx = xla_dx(g, kernel)
  else:
    dx = _typed(functools.partial(_input_grad, route['input_grad'], strides=strides,
                                  lead=lead, in_hw=x.shape[1:3]), xla_dx, g, kernel)
  if route['kernel_grad'] == 'amx':  # bfloat16 x and g; a float32 result, rounded as XLA's
    ours_dk = lambda x, g: ffi.conv2d_bf16_weight_grad(
        x, g, lead, kernel.shape[:2]).astype(x.dtype).astype(kernel.dtype)
  else:
    if route['kernel_grad'] == 'winograd':
      dk_fn = lambda x, g: ffi.winograd_conv3x3_weight_grad(x, g, lead)
    else:
      dk_fn = lambda x, g: ffi.conv2d_weight_grad(x, g, strides, lead, kernel.shape[:2])
    ours_dk = lambda x, g: _in_float32(dk_fn, x, g).astype(kernel.dtype)
  dk = _typed(ours_dk, lambda x, g: jax.vjp(lambda k: plain(x, k), kernel)[1](g)[0], x, g)
  return dx, dk


_conv.defvjp(_conv_fwd, _conv_bwd)


def _upconv_as_transpose(kernel):
  """The kernel of the strided convolution whose transpose the up-convolution is:
  out[2i + a, 2j + c] = x[i, j] @ kernel[1 - a, 1 - c] is the input gradient of a 2x2 stride-2
  convolution with kernel w[a, c] = kernel[1 - a, 1 - c]^T."""
  return jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)


def _upconv_plain(backend, x, kernel):
  return backend.fallback(x, kernel, **UPCONV_ARGS, dimension_numbers=NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _upconv(x, kernel, backend):
  return _upconv_plain(backend, x, kernel)  # XLA's matmul: no slower than ours (RESULTS.md)


def _upconv_fwd(x, kernel, backend):
  return _upconv(x, kernel, backend), (x, kernel)


def _upconv_bwd(backend, residuals, g):
  """The gradients as those of the 2x2 stride-2 convolution whose transpose it is: they need no
  transposed copies, which XLA:CPU makes for a transposed convolution's gradients."""
  x, kernel = residuals

  def ours(x, kernel, g):
    w = _upconv_as_transpose(kernel)
    route = routes(w.shape, (2, 2), g.shape[1:3], x.shape[1:3], g.dtype, backend.amx)
    dx = _forward(route['forward'], g, w, (2, 2), (0, 0), x.shape[1:3])
    dw = _in_float32(lambda g, x: ffi.conv2d_weight_grad(g, x, (2, 2), (0, 0), (2, 2)), g, x)
    return dx, jnp.flip(dw.transpose(0, 1, 3, 2), (0, 1)).astype(kernel.dtype)

  def xla(x, kernel, g):
    return jax.vjp(lambda x, k: _upconv_plain(backend, x, k), x, kernel)[1](g)
  return _typed(ours, xla, x, kernel, g)


_upconv.defvjp(_upconv_fwd, _upconv_bwd)


# ---- Dispatch ----

def _nhwc(lhs, rhs, dimension_numbers) -> bool:
  return (dimension_numbers is not None
          and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC))


def _pairs(v):
  return None if v is None else tuple(tuple(int(a) for a in p) for p in v)


@dataclasses.dataclass(frozen=True)
class KernelConvolution:
  """`lax.conv_general_dilated` with the CPU kernels where they cover the convolution, and
  `fallback` (the same signature) elsewhere; see the module docstring. `amx`: whether
  bfloat16 convolutions take the AMX kernels (`ffi.amx_available()` where the model is
  created). Hashable and compared by value, as a flax module's attribute must be."""

  fallback: Callable
  amx: bool = False

  def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None,
               rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
               batch_group_count=1, precision=None, preferred_element_type=None):
    ones = lambda d: d is None or all(v == 1 for v in d)
    plain = (lhs.ndim == 4 and lhs.dtype in (jnp.float32, jnp.bfloat16)
             and ones(rhs_dilation) and feature_group_count == 1 and batch_group_count == 1
             and precision is None and preferred_element_type is None
             and _nhwc(lhs, rhs, dimension_numbers))
    if plain and ones(lhs_dilation) and rhs.dtype in (lhs.dtype, jnp.float32):
      if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
      return _conv(lhs, rhs, tuple(int(s) for s in window_strides), _pairs(padding), self)
    if (plain and rhs.dtype == lhs.dtype and rhs.shape[:2] == (2, 2)
        and tuple(window_strides) == UPCONV_ARGS['window_strides'] and lhs_dilation is not None
        and tuple(lhs_dilation) == UPCONV_ARGS['lhs_dilation']
        and not isinstance(padding, str) and _pairs(padding) == UPCONV_ARGS['padding']):
      return _upconv(lhs, rhs, self)
    return self.fallback(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                         dimension_numbers, feature_group_count, batch_group_count, precision,
                         preferred_element_type)
