"""The U-Net's 3x3 convolutions on a CPU, per layer: XLA's against our compiled kernels.

    python benchmarks/conv_layers.py [--steps=5] [--batch=10] [--dtype=float32|bfloat16]

For each layer at 192x256 (batch 10) it times the forward, the input gradient and the kernel
gradient, each as XLA's (`lax.conv_general_dilated` and its VJP) and as ours
(`skinmtl_jax.kernels`: GEMMs over gathered windows, and Winograd's F(2x2, 3x3) for stride 1),
marks what `model.conv_impl='auto'` routes each to (`skinmtl_jax.kernels.routes`), adds up
the routed choices, and prints the largest difference of ours relative to XLA's largest
value. The whole
training step with either is `benchmarks/vs_monai.py --conv_impl=auto,xla`.

`--dtype=bfloat16` times the layers on bfloat16 operands (`model.dtype='bfloat16'`): XLA's
bfloat16 convolution, our float32 kernels on their values (rounded to bfloat16 at the end) and,
on a CPU with AMX-BF16, `kernels.conv2d_bf16` for the forward and the stride-1 input gradient
and `kernels.conv2d_bf16_weight_grad` for the stride-1 kernel gradient.
The differences are then one bfloat16 rounding (about 4e-3).
"""

from __future__ import annotations

import functools
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
from skinmtl_jax.kernels import routing

_NHWC = ('NHWC', 'HWIO', 'NHWC')

# (H, W, C_in, C_out, stride): the U-Net's 3x3 convolutions at 192x256 (configs/unet.py).
LAYERS = ((192, 256, 3, 32, 1), (192, 256, 32, 32, 1), (192, 256, 64, 32, 1),
          (192, 256, 32, 64, 2), (96, 128, 64, 64, 1), (96, 128, 128, 64, 1),
          (96, 128, 64, 128, 2), (48, 64, 128, 128, 1), (24, 32, 256, 256, 1),
          (12, 16, 320, 320, 1))
PARTS = ('forward', 'input_grad', 'kernel_grad')


def _plain(x, kernel, strides, pads):
  return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_NHWC)


CHOICES = ('xla', 'gemm', 'winograd', 'amx')


def _functions(h, w, s, pads, out_hw, amx):
  """{part: {choice: jitted function of (x, k, g)}}, the choices `routing.routes` picks from."""
  lead = (pads[0][0], pads[1][0])
  plain = lambda x, k: _plain(x, k, (s, s), pads)
  in_f32 = routing._in_float32  # the float32 kernels on bfloat16 values too
  out = {'forward': {'xla': lambda x, k, g: plain(x, k)},
         'input_grad': {'xla': lambda x, k, g: jax.vjp(lambda x: plain(x, k), x)[1](g)[0]},
         'kernel_grad': {'xla': lambda x, k, g: jax.vjp(lambda k: plain(x, k), k)[1](g)[0],
                         'gemm': lambda x, k, g: in_f32(
                             lambda x, g: kernels.conv2d_weight_grad(x, g, (s, s), lead, (3, 3)),
                             x, g)}}
  choices = ('gemm', 'winograd') if s == 1 else ('gemm',)
  choices += ('amx',) if amx else ()
  for choice in choices:
    out['forward'][choice] = functools.partial(
        lambda c, x, k, g: routing._forward(c, x, k, (s, s), lead, out_hw), choice)
    if choice != 'amx' or s == 1:
      out['input_grad'][choice] = functools.partial(
          lambda c, x, k, g: routing._input_grad(c, g, k, (s, s), lead, (h, w)), choice)
  if s == 1:
    out['kernel_grad']['winograd'] = lambda x, k, g: in_f32(
        lambda x, g: kernels.winograd_conv3x3_weight_grad(x, g, lead), x, g)
    if amx:
      out['kernel_grad']['amx'] = lambda x, k, g: kernels.conv2d_bf16_weight_grad(
          x, g, lead, (3, 3)).astype(x.dtype)
  return {part: {c: jax.jit(f) for c, f in fs.items()} for part, fs in out.items()}


def main(steps: int, batch: int, dtype: str):
  if not kernels.available():
    raise SystemExit(f'The CPU kernels are not available: {kernels.status()}')
  amx = dtype == 'bfloat16' and kernels.amx_available()
  names = CHOICES if amx else CHOICES[:3]
  print(f'JAX {jax.__version__}, {jax.devices()[0].device_kind}, {kernels.threads()} threads, '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; {dtype}, batch {batch}, median of '
        f'{steps} calls after one warm-up. ms as {" / ".join(names).replace("xla", "XLA")} '
        "(- where not applicable); * marks what model.conv_impl='auto' routes to\n")
  print('| input | out ch | stride | forward | input grad | kernel grad | routed total | '
        'XLA total | max rel diff |')
  print('| --- | --- | --- | --- | --- | --- | --- | --- | --- |')
  rng = np.random.default_rng(0)
  sums = np.zeros(2)
  for h, w, cin, cout, s in LAYERS:
    x = jnp.asarray(rng.standard_normal((batch, h, w, cin)), dtype)
    k = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) * 0.1, dtype)
    pads = tuple(tuple(p) for p in lax.padtype_to_pads((h, w), (3, 3), (s, s), 'SAME'))
    out_shape = _plain(x, k, (s, s), pads).shape
    g = jnp.asarray(rng.standard_normal(out_shape), dtype)
    route = routing.routes(k.shape, (s, s), (h, w), out_shape[1:3], dtype, amx)
    cells, routed, xla_total, diff = [], 0.0, 0.0, 0.0
    for part, fs in _functions(h, w, s, pads, out_shape[1:3], amx).items():
      if part == 'input_grad' and cin == 3:  # the image needs none: not part of the step
        cells.append('-')
        continue
      times = {c: _median_ms(f, (x, k, g), steps) for c, f in fs.items()}
      cells.append(' / '.join(
          '-' if c not in times else f'{times[c]:.3g}' + ('*' if route[part] == c else '')
          for c in names))
      routed += times[route[part]]
      xla_total += times['xla']
      ref = fs['xla'](x, k, g)
      diff = max([diff] + [_rel(ref, f(x, k, g)) for c, f in fs.items() if c != 'xla'])
    sums += (routed, xla_total)
    print(f'| {h}x{w}x{cin} | {cout} | {s} | ' + ' | '.join(cells) +
          f' | {routed:.3g} | {xla_total:.3g} | {diff:.0e} |', flush=True)
  print(f'\nAll layers: XLA {sums[1]:.0f} ms, routed (model.conv_impl=auto) {sums[0]:.0f} ms '
        f'({sums[1] / sums[0]:.2f}x).')


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_integer('steps', 5, 'Timed calls per measurement (after one warm-up call).')
  flags.DEFINE_integer('batch', 10, 'Batch size.')
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Dtype of the operands.')
  app.run(lambda argv: main(flags.FLAGS.steps, flags.FLAGS.batch, flags.FLAGS.dtype))
