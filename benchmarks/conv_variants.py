"""Why the U-Net trains slowly on XLA's CPU backend, and a mathematically identical fix.

    python benchmarks/conv_variants.py [--parts=layers,convs,model] [--config=configs/unet.py]
        [--steps=3] [--repeats=2]

Sections (`--parts`):

  layers  Each decoder up-convolution of the U-Net (2x2 kernel, stride 2, batch 10 at 192x256):
          flax's `nn.ConvTranspose` (what `DecoderLevel` used before; `lax.conv_transpose`,
          i.e. an input-dilated convolution) against `UpConv2x2`, what it uses now
          (`skinmtl_jax/models/unet.py`: one matmul, then depth-to-space), with the same
          parameters. Forward ms, forward+backward ms, and the
          largest differences of the outputs and of both gradients.
  convs   A 3x3 convolution's forward, input gradient and weight gradient: NHWC float32 (ours),
          NCHW float32, NHWC bfloat16.
  model   The whole training step of `--config` (`steps.make_train_step`, member axis K = 1,
          exactly what training runs) with the model as it is (`UpConv2x2`) and with
          `DecoderLevel`'s up-convolution put back to flax's `nn.ConvTranspose`: parameters compared leaf by leaf, the
          training forward's outputs and the gradients compared, and ms per step, per forward
          alone and per value_and_grad alone; also a plain jit of the unvmapped step.

`--steps=0` skips the timings (the model part then only checks equivalence; add e.g.
`--config.data.image_size='(64,64)'` for a quick check).

Baseline and variant are timed interleaved in the same process (`--repeats` rounds, medians
reported), because other jobs may share the CPU.
"""

import contextlib
import functools
import os
import sys
import time

# Config files import their parents as `configs.*`: make the repository root importable.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from absl import app, flags  # pylint: disable=g-import-not-at-top
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from skinmtl_jax import losses, models, steps
from skinmtl_jax.models import conv
from skinmtl_jax.models import unet as unet_module
from skinmtl_jax.models.unet import UpConv2x2


def _define_flags():
  """Only when run as a script: benchmarks/vs_monai.py imports flax_upconv from here."""
  config_flags.DEFINE_config_file('config', 'configs/unet.py', 'Model config (model part).')
  flags.DEFINE_list('parts', ['layers', 'convs', 'model'], 'Sections to run.')
  flags.DEFINE_integer('steps', 3, 'Timed calls per measurement (after one warm-up call).')
  flags.DEFINE_integer('repeats', 2, 'Interleaved rounds of baseline and variant; medians.')
  flags.DEFINE_integer('batch', 10, 'Batch size.')


FLAGS = flags.FLAGS


def _flax_upconv(features, dtype=jnp.float32, conv_general_dilated=None, name=None):
  """The decoder's up-convolution as it was before UpConv2x2: flax's `nn.ConvTranspose` (its
  own convolution, whatever the model's is)."""
  del conv_general_dilated
  return nn.ConvTranspose(features, (2, 2), strides=(2, 2), dtype=dtype, name=name)


@contextlib.contextmanager
def flax_upconv(enabled: bool):
  """While active (and `enabled`), `DecoderLevel` builds its up-convolution with flax's
  `nn.ConvTranspose` (the former model) instead of `UpConv2x2`. Tracing (hence compiling) must
  happen inside; a compiled function keeps its variant."""
  if not enabled:
    yield
    return
  saved = unet_module.UpConv2x2
  unet_module.UpConv2x2 = _flax_upconv
  try:
    yield
  finally:
    unet_module.UpConv2x2 = saved


def _median_ms(fn, args, n, prepare=None):
  """Median ms of `n` calls after one warm-up; `prepare()` makes fresh args (donation)."""
  if prepare:
    args = prepare()
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(n):
    if prepare:
      args = prepare()
      jax.block_until_ready(args)
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t)
  return 1000 * float(np.median(ts))


def _interleaved(cases, n, repeats):
  """cases: {name: (fn, args, prepare)} -> {name: median ms over rounds}, rounds interleaved."""
  times = {k: [] for k in cases}
  for _ in range(repeats):
    for k, (fn, args, prepare) in cases.items():
      times[k].append(_median_ms(fn, args, n, prepare))
  return {k: float(np.median(v)) for k, v in times.items()}


def _rel(a, b):
  """Largest |a - b| over the largest |a|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


def _tree_rel(a, b):
  return max(jax.tree.leaves(jax.tree.map(_rel, a, b)))


def part_layers(b, size):
  """The five up-convolutions of the U-Net decoder."""
  feats = (32, 64, 128, 256, 320, 320)
  h, w = size[0] // 32, size[1] // 32
  print(f'\n## Decoder up-convolutions (2x2, stride 2), batch {b}\n')
  print('| input | out ch | flax fwd ms | flax fwd+bwd ms | UpConv2x2 fwd ms '
        '| UpConv2x2 fwd+bwd ms | fwd+bwd speed-up | max rel diff out / dx / dkernel |')
  print('| --- | --- | --- | --- | --- | --- | --- | --- |')
  rng = np.random.default_rng(0)
  cin = feats[-1]
  for cout in reversed(feats[:-1]):
    x = jnp.asarray(rng.standard_normal((b, h, w, cin), np.float32))
    ref = nn.ConvTranspose(cout, (2, 2), strides=(2, 2))
    new = UpConv2x2(cout, conv_general_dilated=conv.select('auto'))  # as the model's
    variables = ref.init(jax.random.key(0), x)
    variables_new = new.init(jax.random.key(0), x)
    assert jax.tree.all(jax.tree.map(lambda p, q: bool(jnp.array_equal(p, q)), variables,
                                     variables_new)), 'different initial parameters'
    g = jnp.asarray(rng.standard_normal((b, 2 * h, 2 * w, cout), np.float32))
    fns = {}
    for name, mod in (('flax', ref), ('new', new)):
      fwd = jax.jit(lambda v, x, mod=mod: mod.apply(v, x))
      bwd = jax.jit(lambda v, x, g, mod=mod: jax.vjp(lambda v, x: mod.apply(v, x), v, x)[1](g))
      fns[name] = (fwd, bwd)
    diff_out = _rel(fns['flax'][0](variables, x), fns['new'][0](variables, x))
    (gv_ref, gx_ref), (gv_new, gx_new) = fns['flax'][1](variables, x, g), fns['new'][1](
        variables, x, g)
    diff_dx = _rel(gx_ref, gx_new)
    diff_dk = _rel(gv_ref['params']['kernel'], gv_new['params']['kernel'])
    t = _interleaved({
        'flax_fwd': (fns['flax'][0], (variables, x), None),
        'flax_bwd': (fns['flax'][1], (variables, x, g), None),
        'new_fwd': (fns['new'][0], (variables, x), None),
        'new_bwd': (fns['new'][1], (variables, x, g), None)}, FLAGS.steps, FLAGS.repeats)
    print(f'| {h}x{w}x{cin} | {cout} | {t["flax_fwd"]:.1f} | {t["flax_bwd"]:.1f} '
          f'| {t["new_fwd"]:.1f} | {t["new_bwd"]:.1f} | {t["flax_bwd"] / t["new_bwd"]:.1f}x '
          f'| {diff_out:.1e} / {diff_dx:.1e} / {diff_dk:.1e} |', flush=True)
    h, w, cin = 2 * h, 2 * w, cout


def _conv(x, w, layout, stride):
  dn = ('NHWC', 'HWIO', 'NHWC') if layout == 'NHWC' else ('NCHW', 'OIHW', 'NCHW')
  return lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                  dimension_numbers=dn)


def part_convs(b):
  """3x3 convolutions: forward, input gradient, weight gradient; layouts and dtypes."""
  print(f'\n## 3x3 convolutions, batch {b}: forward / input gradient / weight gradient, ms\n')
  print('| input | out ch | stride | NHWC f32 | NCHW f32 | NHWC bf16 |')
  print('| --- | --- | --- | --- | --- | --- |')
  rng = np.random.default_rng(0)
  for (h, w, cin, cout, s) in ((192, 256, 32, 32, 1), (192, 256, 32, 64, 2),
                               (48, 64, 128, 128, 1), (48, 64, 128, 256, 2),
                               (12, 16, 640, 320, 1)):
    cases = {}
    for variant in ('NHWC f32', 'NCHW f32', 'NHWC bf16'):
      layout, dt = variant.split()
      dtype = jnp.float32 if dt == 'f32' else jnp.bfloat16
      x = jnp.asarray(rng.standard_normal((b, h, w, cin), np.float32), dtype)
      k = jnp.asarray(rng.standard_normal((3, 3, cin, cout), np.float32), dtype)
      if layout == 'NCHW':
        x, k = x.transpose(0, 3, 1, 2), k.transpose(3, 2, 0, 1)
      y = _conv(x, k, layout, s)
      g = jnp.ones_like(y)
      conv = functools.partial(_conv, layout=layout, stride=s)
      cases[variant + ' fwd'] = (jax.jit(conv), (x, k), None)
      cases[variant + ' dx'] = (jax.jit(lambda x, k, g, conv=conv: jax.vjp(
          lambda x: conv(x, k), x)[1](g)), (x, k, g), None)
      cases[variant + ' dw'] = (jax.jit(lambda x, k, g, conv=conv: jax.vjp(
          lambda k: conv(x, k), k)[1](g)), (x, k, g), None)
    t = _interleaved(cases, FLAGS.steps, FLAGS.repeats)
    cells = [' / '.join(f'{t[f"{v} {p}"]:.0f}' for p in ('fwd', 'dx', 'dw'))
             for v in ('NHWC f32', 'NCHW f32', 'NHWC bf16')]
    print(f'| {h}x{w}x{cin} | {cout} | {s} | ' + ' | '.join(cells) + ' |', flush=True)


def random_batch(b, size, seed=0):
  rng = np.random.default_rng(seed)
  return {'image': jnp.asarray(rng.integers(0, 256, (b, *size, 3), dtype=np.uint8)),
          'mask': jnp.asarray(rng.integers(0, 2, (b, *size), dtype=np.uint8)),
          'label': jnp.asarray(rng.integers(0, 2, (b,), dtype=np.int32))}


def part_model(cfg, b):
  size = tuple(cfg.data.image_size)
  batch = random_batch(b, size)
  model = models.create_model(cfg.model)
  tx = steps.create_optimizer(cfg.optim, 1000)
  loss = losses.LossConfig.from_config(cfg.loss)
  print(f'\n## Whole model: {cfg.experiment}, {size[0]}x{size[1]}, batch {b}\n', flush=True)
  built = {}
  for variant in ('flax ConvTranspose', 'UpConv2x2'):
    with flax_upconv(variant == 'flax ConvTranspose'):
      t0 = time.perf_counter()
      state = steps.create_train_state(model, tx, steps.member_keys(0, 1), size)
      one = steps.member(state, 0)

      def loss_fn(params, bs):
        outputs, new_vars = model.apply({'params': params, 'batch_stats': bs},
                                        steps.to_float_images(batch['image']), train=True,
                                        mutable=['batch_stats'])
        terms = losses.loss_terms(outputs, batch, dice_smooth=loss.dice_smooth)
        return losses.weighted_loss(terms, loss.weights), outputs

      fwd = jax.jit(loss_fn).lower(one.params, one.batch_stats).compile()
      grad = jax.jit(jax.grad(lambda p, bs: loss_fn(p, bs)[0])).lower(
          one.params, one.batch_stats).compile()
      step = plain = None
      if FLAGS.steps > 0:  # --steps=0: only the equivalence checks
        step = steps.make_train_step(model, tx, shared_batch=True, loss=loss)
        step = step.lower(state, batch).compile()
        plain = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, loss=loss),
                        donate_argnums=0).lower(one, batch).compile()
      print(f'{variant}: compiled in {time.perf_counter() - t0:.0f} s', flush=True)
      built[variant] = dict(state=state, one=one, fwd=fwd, grad=grad, step=step, plain=plain)

  base, new = built['flax ConvTranspose'], built['UpConv2x2']
  same = jax.tree.structure(base['state']) == jax.tree.structure(new['state']) and all(
      bool(jnp.array_equal(p, q)) for p, q in zip(jax.tree.leaves(base['state'].params),
                                                  jax.tree.leaves(new['state'].params)))
  print(f'initial parameters identical (names, shapes, values): {same}')
  p, bs = base['one'].params, base['one'].batch_stats
  (l0, o0), (l1, o1) = base['fwd'](p, bs), new['fwd'](p, bs)
  print(f'training forward with the same parameters: loss {float(l0):.7f} vs {float(l1):.7f}; '
        f'max rel diff of outputs {_tree_rel(o0, o1):.1e}')
  g0, g1 = base['grad'](p, bs), new['grad'](p, bs)
  leaves0 = jax.tree_util.tree_leaves_with_path(g0)
  leaves1 = jax.tree.leaves(g1)
  norm = lambda t: float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                                     for x in jax.tree.leaves(t))))
  print(f'gradients: |g - g_new| / |g| over all parameters '
        f'{norm(jax.tree.map(lambda a, b: a - b, g0, g1)) / norm(g0):.1e}')
  # Leaf by leaf; a conv bias followed by BatchNorm has a gradient that is zero up to rounding
  # (BatchNorm removes the mean), so its relative difference is rounding noise over noise.
  rows = sorted(((_rel(a, b), float(np.max(np.abs(a))), jax.tree_util.keystr(k))
                 for (k, a), b in zip(leaves0, leaves1)), reverse=True)
  big = [r for r in rows if not (r[2].endswith("['conv']['bias']") and 'seg_head' not in r[2])]
  print('largest leaf-wise max|diff|/max|grad|, conv biases before BatchNorm excluded: ' +
        '; '.join(f'{name} {rel:.1e} (max|grad| {mag:.1e})' for rel, mag, name in big[:3]))
  print('conv biases before BatchNorm: max|grad| at most '
        f'{max(r[1] for r in rows if r not in big):.1e}', flush=True)

  if FLAGS.steps <= 0:
    return

  def fresh(v):
    return lambda: (jax.tree.map(jnp.copy, built[v]['state']), batch)

  def fresh_one(v):
    return lambda: (jax.tree.map(jnp.copy, built[v]['one']), batch)

  cases = {}
  for v in built:
    cases[(v, 'fwd')] = (built[v]['fwd'], (p, bs), None)
    cases[(v, 'grad')] = (built[v]['grad'], (p, bs), None)
    cases[(v, 'step')] = (built[v]['step'], None, fresh(v))
    cases[(v, 'plain')] = (built[v]['plain'], None, fresh_one(v))
  t = _interleaved(cases, FLAGS.steps, FLAGS.repeats)
  print('\n| model variant | forward ms | grad ms | train step ms (vmap K=1) '
        '| train step ms (plain jit) | images/s (step) |')
  print('| --- | --- | --- | --- | --- | --- |')
  for v in built:
    print(f'| {v} | {t[(v, "fwd")]:.0f} | {t[(v, "grad")]:.0f} | {t[(v, "step")]:.0f} '
          f'| {t[(v, "plain")]:.0f} | {1000 * b / t[(v, "step")]:.2f} |')
  print(f'\nstep speed-up with UpConv2x2: '
        f'{t[("flax ConvTranspose", "step")] / t[("UpConv2x2", "step")]:.2f}x', flush=True)


def main(argv):
  del argv
  print(f'JAX {jax.__version__}, devices {jax.devices()}, '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  size = tuple(FLAGS.config.data.image_size)
  if 'layers' in FLAGS.parts:
    part_layers(FLAGS.batch, size)
  if 'convs' in FLAGS.parts:
    part_convs(FLAGS.batch)
  if 'model' in FLAGS.parts:
    part_model(FLAGS.config, FLAGS.batch)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
