"""The kernel gradient of the U-Net's 3x3 convolutions on a CPU: XLA's against our kernel.

    python benchmarks/weight_grad.py [--steps=5] [--batch=10]

XLA:CPU computes a convolution's kernel gradient as another convolution whose window is the
whole feature map and whose output is the small kernel: up to 9x the forward's time here
(benchmarks/RESULTS.md). `model.weight_grad='auto'` (the default) replaces it on CPUs by the
compiled kernel of `skinmtl_jax/kernels` through `skinmtl_jax/models/conv.py`: one GEMM per
kernel tap over the activations in place (strided convolutions by space-to-depth). This script
times, per layer at 192x256 (batch 10): the forward, XLA's kernel gradient, ours (with the
padding and space-to-depth copies it needs), and their largest difference relative to XLA's.
The whole training step with either is
`benchmarks/vs_monai.py --weight_grad=auto,xla`.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top
from jax import lax
import jax.numpy as jnp
import numpy as np

from conv_variants import _median_ms, _rel  # pylint: disable=g-import-not-at-top
from skinmtl_jax import kernels
from skinmtl_jax.models import conv

_NHWC = ('NHWC', 'HWIO', 'NHWC')

# (H, W, C_in, C_out, stride): the U-Net's 3x3 convolutions at 192x256 (configs/unet.py).
LAYERS = ((192, 256, 3, 32, 1), (192, 256, 32, 32, 1), (192, 256, 64, 32, 1),
          (192, 256, 32, 64, 2), (96, 128, 64, 64, 1), (96, 128, 128, 64, 1),
          (96, 128, 64, 128, 2), (48, 64, 128, 128, 1), (24, 32, 256, 256, 1),
          (12, 16, 320, 320, 1))


def _plain(x, kernel, strides, pads):
  return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_NHWC)


def main(steps: int, batch: int):
  if not kernels.available():
    raise SystemExit(f'The CPU kernel is not available: {kernels.status()}')
  print(f'JAX {jax.__version__}, {jax.devices()[0].device_kind}, {kernels._threads()} threads, '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; batch {batch}, median of {steps} '
        'calls after one warm-up\n')
  print('| input | out ch | stride | forward ms | XLA kernel grad ms | our kernel grad ms | '
        'speed-up | max rel diff |')
  print('| --- | --- | --- | --- | --- | --- | --- | --- |')
  rng = np.random.default_rng(0)
  total = [0.0, 0.0]
  for h, w, cin, cout, s in LAYERS:
    x = jnp.asarray(rng.standard_normal((batch, h, w, cin)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) * 0.1, jnp.float32)
    pads = tuple(tuple(p) for p in lax.padtype_to_pads((h, w), (3, 3), (s, s), 'SAME'))
    g = jnp.asarray(rng.standard_normal(_plain(x, k, (s, s), pads).shape), jnp.float32)
    fwd = jax.jit(lambda x, k: _plain(x, k, (s, s), pads))
    xla = jax.jit(lambda x, k, g: jax.vjp(lambda k: _plain(x, k, (s, s), pads), k)[1](g)[0])
    ours = jax.jit(lambda x, g: conv.kernel_grad_by_gemm(x, g, (3, 3), (s, s), pads))
    t = [_median_ms(fwd, (x, k), steps), _median_ms(xla, (x, k, g), steps),
         _median_ms(ours, (x, g), steps)]
    total = [total[0] + t[1], total[1] + t[2]]
    print(f'| {h}x{w}x{cin} | {cout} | {s} | ' + ' | '.join(f'{v:.0f}' for v in t) +
          f' | {t[1] / t[2]:.1f}x | {_rel(xla(x, k, g), ours(x, g)):.0e} |', flush=True)
  print(f'\nAll layers: XLA {total[0]:.0f} ms, ours {total[1]:.0f} ms '
        f'({total[0] / total[1]:.1f}x).')


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_integer('steps', 5, 'Timed calls per measurement (after one warm-up call).')
  flags.DEFINE_integer('batch', 10, 'Batch size.')
  app.run(lambda argv: main(flags.FLAGS.steps, flags.FLAGS.batch))
