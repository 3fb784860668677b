"""Where one CPU training step's (or inference call's) time goes, by kind of XLA operation.

    python benchmarks/step_profile.py [--config=configs/unet.py] [--batch=10]
        [--image_size=192,256] [--top=10] [--config.model.conv_impl=xla] [--infer]

Compiles the training step exactly as training does (`steps.make_train_step`, K = 1), or with
`--infer` the inference call (`steps.predict`, jitted, eval mode), runs it
twice, then traces a third call with `jax.profiler` (a Perfetto trace) and adds up the time of
every operation the step ran, summed over threads. Each operation is named by the compiled
HLO (`compiled.as_text()`); convolutions are sorted into weight gradients (a window as large
as the feature map: XLA's form of the kernel gradient), and forward or input-gradient
convolutions (a 3x3 window). On a CPU the convolutions run as YNNPACK fusions
(`ynn_fusion.N`). Prints the totals per kind and the `--top` slowest operations.
"""

import collections
import functools
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

# Config files import their parents as `configs.*`: make the repository root importable.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # pylint: disable=g-import-not-at-top
import jax
from ml_collections import config_flags
import numpy as np

from skinmtl_jax import kernels, losses, models, steps
from dynunet import random_batch  # pylint: disable=g-import-not-at-top

config_flags.DEFINE_config_file('config', 'configs/unet.py', 'Model config.')
flags.DEFINE_integer('batch', 10, 'Batch size.')
flags.DEFINE_list('image_size', ['192', '256'], 'H,W.')
flags.DEFINE_integer('top', 10, 'Slowest operations listed.')
flags.DEFINE_bool('infer', False, 'Profile inference (steps.predict) instead of a training step.')
FLAGS = flags.FLAGS


def _kind(name: str, hlo: str) -> tuple[str, str]:
  """(kind, what) of the operation `name` in the compiled HLO text."""
  line = re.search(r'%' + re.escape(name) + r' = ([^\n]*)', hlo)
  if not line:
    return 'other', ''
  body = line.group(1)
  calls = re.search(r'calls=%([\w.\-]+)', body)
  if calls:
    fused = re.search(r'\n%' + re.escape(calls.group(1)) + r' [^\n]*\{\n(.*?)\n\}', hlo, re.S)
    body = fused.group(1) if fused else body
  conv = re.search(r'= (\S+) convolution\([^)]*\), window=\{size=(\d+)x(\d+)', body)
  if conv:
    what = f'{conv.group(1)} window {conv.group(2)}x{conv.group(3)}'
    if int(conv.group(2)) * int(conv.group(3)) > 9:
      return 'convolution: weight gradient', what
    return 'convolution: forward or input gradient', what
  if ' dot(' in body:
    return 'dot', ''
  for target, what in ((kernels.CONV, 'GEMM convolution'), (kernels.WINOGRAD, 'Winograd'),
                       (kernels.INPUT_GRAD, 'input gradient'),
                       (kernels.WEIGHT_GRAD, 'GEMM kernel gradient'),
                       (kernels.WINOGRAD_WEIGHT_GRAD, 'Winograd kernel gradient'),
                       (kernels.CONV_BF16, 'AMX bfloat16 convolution'),
                       (kernels.CONV_BF16_F32, 'AMX bfloat16 convolution'),
                       (kernels.CONV_BF16_WF32, 'AMX bfloat16 convolution'),
                       (kernels.CONV_BF16_WEIGHT_GRAD, 'AMX bfloat16 kernel gradient')):
    if f'custom_call_target="{target}"' in body:
      return f'our CPU kernel: {what} (skinmtl_jax/kernels)', ''
  return re.sub(r'[.\d]+$', '', name), ''


def main(argv):
  del argv
  cfg = FLAGS.config
  size = tuple(int(v) for v in FLAGS.image_size)
  model = models.create_model(cfg.model)
  tx = steps.create_optimizer(cfg.optim, 1000)
  state = steps.create_train_state(model, tx, steps.member_keys(0, 1), size)
  batch = jax.device_put(random_batch(FLAGS.batch, size, np.random.default_rng(0)))
  if FLAGS.infer:
    variables = {'params': steps.member(state.params, 0),
                 'batch_stats': steps.member(state.batch_stats, 0)}
    compiled = jax.jit(functools.partial(steps.predict, model=model)).lower(
        variables, batch['image']).compile()
    run = lambda: jax.block_until_ready(compiled(variables, batch['image']))
  else:
    step = steps.make_train_step(model, tx, shared_batch=True,
                                 loss=losses.LossConfig.from_config(cfg.loss))
    compiled = step.lower(state, batch).compile()
    inputs = step.inputs_for(batch)

    def run():
      nonlocal state
      state, metrics = compiled(state, batch, inputs)
      jax.block_until_ready(metrics)
  hlo = compiled.as_text()
  for _ in range(2):
    t = time.perf_counter()
    run()
  wall = time.perf_counter() - t
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      run()
    trace = json.load(gzip.open(glob.glob(f'{tmp}/**/*.trace.json.gz', recursive=True)[0]))
  per_op = collections.Counter()
  for e in trace['traceEvents']:
    if e.get('ph') == 'X' and not e['name'].startswith('$') and not any(
        s in e['name'] for s in ('ThunkExecutor', 'ThreadPool', 'PjitFunction')):
      per_op[e['name']] += e['dur'] / 1000
  kinds, counts = collections.Counter(), collections.Counter()
  for name, ms in per_op.items():
    kind = _kind(name, hlo)[0]
    kinds[kind] += ms
    counts[kind] += 1
  total = sum(per_op.values())
  print(f'{cfg.experiment}, {size[0]}x{size[1]}, batch {FLAGS.batch}, JAX {jax.__version__}, '
        f'{jax.devices()[0].device_kind}: {"inference" if FLAGS.infer else "step"} '
        f'{1000 * wall:.0f} ms wall (untraced); '
        f'operations {total:.0f} ms summed over threads\n')
  print('| kind | ms | share | operations |\n| --- | --- | --- | --- |')
  rest = [0.0, 0]
  for kind, ms in kinds.most_common():
    if ms >= 0.01 * total:
      print(f'| {kind} | {ms:.0f} | {100 * ms / total:.1f} % | {counts[kind]} |')
    else:
      rest[0], rest[1] = rest[0] + ms, rest[1] + counts[kind]
  print(f'| everything else (kinds under 1 % each) | {rest[0]:.0f} | '
        f'{100 * rest[0] / total:.1f} % | {rest[1]} |')
  print('\n| slowest operations | ms | kind | output, window |\n| --- | --- | --- | --- |')
  for name, ms in per_op.most_common(FLAGS.top):
    kind, what = _kind(name, hlo)
    print(f'| {name} | {ms:.0f} | {kind} | {what} |')


if __name__ == '__main__':
  app.run(main)
