"""The weight gradient of a 3x3 convolution on XLA:CPU: XLA's own against per-tap dots.

    python benchmarks/weight_grad.py [--steps=5] [--batch=10]

XLA:CPU computes a convolution's weight gradient as another convolution whose window is the
whole feature map and whose output is the small kernel: up to 9x the forward's time here.
`per_tap_conv` is a drop-in `lax.conv_general_dilated` (flax's
`nn.Conv(..., conv_general_dilated=per_tap_conv)`) with a custom VJP: the forward and the
input gradient are XLA's own, and the weight gradient is one dot per kernel tap (the shifted
input pixels that tap reads against the output gradient, contracted over batch, height and
width): the same values up to float32 summation order (`tests/test_weight_grad.py`).

This script times, for the U-Net's 3x3 convolutions at 192x256 (batch 10): the forward, XLA's
weight gradient, the per-tap one, and the per-tap one with bfloat16 operands (float32
accumulation; the CPU's AMX/AVX512-BF16 dots), with their differences from XLA's; then the
GFLOP/s of the dot alone in float32 and bfloat16 (all nine taps of the 96x128, 64->64 layer as
one (576 x pixels) @ (pixels x 64) product, operands already in place). The whole
training step with every convolution's weight gradient per tap is a row of
`benchmarks/vs_monai.py --per_tap_weight_grad=also`.

What we measured (benchmarks/RESULTS.md, 2-core CPU): per layer, in isolation, the per-tap
gradient is 1.1-1.9x faster; in the whole training step it is not measurably faster (medians
1.12 against 1.11 images/s for unet at 192x256): the nine shifted copies of the activations
and the dots take the time the weight-gradient convolutions gave up (`step_profile.py`). So
the models keep XLA's gradient; this stays as the measurement.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

# Make the repository root importable (skinmtl_jax, configs).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from conv_variants import _median_ms, _rel  # pylint: disable=g-import-not-at-top

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _plain(x, kernel, strides, pads):
  return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_NHWC)


def _shifted_inputs(x, kernel_shape, strides, pads, out_hw):
  """For each kernel tap (i, j), row by row: the input pixels that tap reads, (N, H_out,
  W_out, C_in), so that tap's weight gradient is a dot with the output gradient."""
  kh, kw = kernel_shape
  x = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  (sh, sw), (ho, wo) = strides, out_hw
  return [x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
          for i in range(kh) for j in range(kw)]


def per_tap_weight_gradient(x, g, kernel_shape, strides, pads, dot_dtype=None):
  """The kernel's gradient, (kh, kw, C_in, C_out), as one dot per tap, float32 accumulation:
  (pixels, C_in)^T @ (pixels, C_out), pixels = batch x height x width."""
  kh, kw, cin, cout = kernel_shape
  if dot_dtype is not None:
    x, g = x.astype(dot_dtype), g.astype(dot_dtype)
  taps = _shifted_inputs(x, (kh, kw), strides, pads, g.shape[1:3])
  g = g.reshape(-1, cout)
  over_pixels = (((0,), (0,)), ((), ()))
  return jnp.stack([
      lax.dot_general(xs.reshape(-1, cin), g, over_pixels, preferred_element_type=jnp.float32)
      for xs in taps]).reshape(kh, kw, cin, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, strides, pads):
  return _plain(x, kernel, strides, pads)


def _conv_fwd(x, kernel, strides, pads):
  return _plain(x, kernel, strides, pads), (x, kernel)


def _conv_bwd(strides, pads, residuals, g):
  x, kernel = residuals
  dx, = jax.vjp(lambda x: _plain(x, kernel, strides, pads), x)[1](g)
  dk = per_tap_weight_gradient(x, g, kernel.shape, strides, pads)
  return dx, dk.astype(kernel.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _covered(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
             batch_group_count, precision) -> bool:
  """A 2-D NHWC/HWIO convolution without dilations, groups or a set precision."""
  ones = lambda d: d is None or all(v == 1 for v in d)
  if not (lhs.ndim == 4 and ones(lhs_dilation) and ones(rhs_dilation)
          and feature_group_count == 1 and batch_group_count == 1 and precision is None
          and dimension_numbers is not None):
    return False
  return (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))


def per_tap_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                 precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` with the per-tap weight gradient. Convolutions it does not
  cover (dilations, groups, other layouts, a set precision) are `lax`'s, unchanged."""
  if preferred_element_type is not None or not _covered(
      lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
      batch_group_count, precision):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  pads = tuple(tuple(int(v) for v in p) for p in padding)
  return _conv(lhs, rhs, tuple(int(s) for s in window_strides), pads)


@contextlib.contextmanager
def per_tap_weight_grad(enabled: bool):
  """While active (and `enabled`), every `nn.Conv` the models build uses `per_tap_conv`.
  Tracing (hence compiling) must happen inside; a compiled function keeps its variant."""
  if not enabled:
    yield
    return
  saved = nn.Conv
  nn.Conv = functools.partial(saved, conv_general_dilated=per_tap_conv)
  try:
    yield
  finally:
    nn.Conv = saved


# (H, W, C_in, C_out, stride): the U-Net's 3x3 convolutions at 192x256 (configs/unet.py).
LAYERS = ((192, 256, 3, 32, 1), (192, 256, 32, 32, 1), (192, 256, 64, 32, 1),
          (192, 256, 32, 64, 2), (96, 128, 64, 64, 1), (96, 128, 128, 64, 1),
          (48, 64, 128, 128, 1), (24, 32, 256, 256, 1), (12, 16, 320, 320, 1))


def main(steps: int, batch: int):
  print(f'JAX {jax.__version__}, {jax.devices()[0].device_kind}, '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; batch {batch}, median of {steps} '
        'calls after one warm-up\n')
  print('| input | out ch | stride | forward ms | XLA weight grad ms | per-tap ms | per-tap '
        'bf16 ms | max rel diff per-tap / bf16 |')
  print('| --- | --- | --- | --- | --- | --- | --- | --- |')
  rng = np.random.default_rng(0)
  for h, w, cin, cout, s in LAYERS:
    x = jnp.asarray(rng.standard_normal((batch, h, w, cin)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) * 0.1, jnp.float32)
    pads = tuple(tuple(p) for p in lax.padtype_to_pads((h, w), (3, 3), (s, s), 'SAME'))
    y = _plain(x, k, (s, s), pads)
    g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    fwd = jax.jit(lambda x, k: _plain(x, k, (s, s), pads))
    xla = jax.jit(lambda x, k, g: jax.vjp(lambda k: _plain(x, k, (s, s), pads), k)[1](g)[0])
    taps = jax.jit(lambda x, k, g: per_tap_weight_gradient(x, g, k.shape, (s, s), pads))
    bf16 = jax.jit(lambda x, k, g: per_tap_weight_gradient(x, g, k.shape, (s, s), pads,
                                                           jnp.bfloat16))
    ref = xla(x, k, g)
    t = [_median_ms(f, a, steps) for f, a in ((fwd, (x, k)), (xla, (x, k, g)),
                                               (taps, (x, k, g)), (bf16, (x, k, g)))]
    print(f'| {h}x{w}x{cin} | {cout} | {s} | ' + ' | '.join(f'{v:.0f}' for v in t) +
          f' | {_rel(ref, taps(x, k, g)):.0e} / {_rel(ref, bf16(x, k, g)):.0e} |', flush=True)
  pixels, k, cout = batch * 96 * 128, 9 * 64, 64
  for dtype in (jnp.float32, jnp.bfloat16):
    a = jnp.asarray(rng.standard_normal((k, pixels)), dtype)
    b = jnp.asarray(rng.standard_normal((pixels, cout)), dtype)
    dot = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    ms = _median_ms(dot, (a, b), steps)
    print(f'\n({k} x {pixels}) @ ({pixels} x {cout}) in {jnp.dtype(dtype).name}: {ms:.0f} ms, '
          f'{2 * k * pixels * cout / ms / 1e6:.0f} GFLOP/s', end='')
  print()


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_integer('steps', 5, 'Timed calls per measurement (after one warm-up call).')
  flags.DEFINE_integer('batch', 10, 'Batch size.')
  app.run(lambda argv: main(flags.FLAGS.steps, flags.FLAGS.batch))
