"""Training throughput and inference latency of our models on this machine's accelerator (or
CPU), in one run and one table.

    python benchmarks/throughput.py [--models=unet,mtl4] [--dtypes=float32,bfloat16]
        [--members=1,2,4,8] [--inputs=constant,resident,streamed] [--input_members=1]
        [--rows=MODEL/DTYPE/K/MODE,...] [--steps=20] [--warmup=2] [--peak_tflops=0]
        [--monai] [--time_budget_s=0] [--json=PATH]
        [--data=synthetic|isic2016 --manual_dir=DIR --data_dir=DIR]
        [--image_size=H,W] [--features=...] [--batch=10]

Every row trains through the code path of `python -m skinmtl_jax.main`: the config
`configs/<model>.py`, `device_input.TrainInput` (grain pipeline, prefetch, global device
batches), `steps.make_train_step` (jit of the step vmapped over K members, the enlargement
transforms inside it). Per model, dtype and K:

  constant  one batch, already on the device, fed again and again: the step alone;
  resident  data.on_device='on': the training split on the device, the pipeline yields indices;
  streamed  data.on_device='off': the pipeline loads uint8 images and ships them each step.

'vs constant' is the input mode's throughput over the constant batch's, measured in the same
run: the pipeline's cost. Input modes other than 'constant' are measured for the K in
`--input_members` only (each row compiles its own step), unless `--rows` lists the rows.
GFLOP/image is XLA's cost analysis of the compiled step (forward, backward, Adam) over
K x batch; TFLOP/s is what the timed steps achieved, and utilisation is that over
`--peak_tflops` (0: not shown; an H200's dense bf16 peak is about 990 by its datasheet).

The mode 'convtranspose' is the constant batch with flax's `nn.ConvTranspose` as the
decoder's up-convolution (the former model) instead of `UpConv2x2`. `--monai` adds MONAI's
DynUNet (same backbone; timed first) when torch and monai are importable: on a GPU with bfloat16
autocast, channels-last and cuDNN autotuning, on a CPU in float32.
Inference latency: `steps.predict` (one member, eval mode, uint8 images in), median of
`--infer_runs` calls per batch size in `--infer_batches`.

Sizes: `--image_size` and `--features` override the configs' (e.g. `--image_size=32,32
--features=4,8,8,16 --batch=4` for a dry run on a CPU); by default the paper's 192x256 and
widths 32...320.
"""

import contextlib
import importlib
import json
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, '..'))   # configs/ import as `configs.*`
sys.path.insert(0, _HERE)

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
import jax
import numpy as np

from skinmtl_jax import device_input, input_pipeline, losses, models, parallel, steps
from dynunet import DynUNet, machine, random_batch  # pylint: disable=g-import-not-at-top

flags.DEFINE_list('models', ['unet', 'mtl4'], 'Configs (configs/<name>.py).')
flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'model.dtype of each row.')
flags.DEFINE_list('members', ['1', '2', '4', '8'], 'Ensemble sizes K (num_seeds).')
flags.DEFINE_list('inputs', ['constant', 'resident', 'streamed', 'convtranspose'],
                  'Input modes (see above).')
flags.DEFINE_list('input_members', ['1'], 'K for which the modes other than constant run.')
flags.DEFINE_list('rows', [], 'Explicit rows MODEL/DTYPE/K/MODE (e.g. mtl4/bfloat16/8/constant) '
                  'instead of the product of --models, --dtypes, --members and --inputs.')
flags.DEFINE_float('time_budget_s', 0.0, 'Skip the rows that would start after this many '
                   'seconds (0: no limit); the table says which were skipped.')
flags.DEFINE_enum('order', 'shared', ['shared', 'per_member'],
                  'seed_data_order of K > 1 (per_member: each member reads its own batches).')
flags.DEFINE_integer('steps', 20, 'Timed training steps per row.')
flags.DEFINE_integer('warmup', 2, 'Untimed steps before (after compiling).')
flags.DEFINE_integer('batch', 10, 'Training batch size per member.')
flags.DEFINE_list('image_size', [], 'H,W (default: the config\'s).')
flags.DEFINE_list('features', [], 'Model widths, shallow to deep (default: the config\'s).')
flags.DEFINE_enum('data', 'synthetic', ['synthetic', 'isic2016'], 'Training data of the '
                  'resident and streamed modes.')
flags.DEFINE_integer('num_train', 200, 'Synthetic training images.')
flags.DEFINE_string('manual_dir', '', 'data.manual_dir for --data=isic2016.')
flags.DEFINE_string('data_dir', '', 'data.data_dir for --data=isic2016.')
flags.DEFINE_list('infer_batches', ['1', '32'], 'Inference batch sizes.')
flags.DEFINE_integer('infer_runs', 10, 'Timed inference calls per batch size (median).')
flags.DEFINE_float('peak_tflops', 0.0, 'Peak of the device for the utilisation column.')
flags.DEFINE_bool('monai', False, 'Also time MONAI\'s DynUNet (needs torch and monai).')
flags.DEFINE_string('json', '', 'Also write the rows and the machine to this JSON file.')
flags.DEFINE_integer('seed', 0, 'Seed of models and data.')
FLAGS = flags.FLAGS


def environment() -> dict:
  device = jax.devices()[0]
  env = {'machine': machine(), 'jax': jax.__version__, 'backend': jax.default_backend(),
         'device': getattr(device, 'device_kind', str(device)), 'devices': jax.device_count()}
  try:
    from jax.extend import backend as jax_backend  # pylint: disable=g-import-not-at-top
    env['platform_version'] = jax_backend.get_backend().platform_version
  except Exception:  # pylint: disable=broad-except  (informational only)
    pass
  return env


def make_config(name: str, dtype: str, k: int, on_device: str = 'off'):
  cfg = importlib.import_module(f'configs.{name}').get_config()
  if FLAGS.image_size:
    cfg.data.image_size = tuple(int(v) for v in FLAGS.image_size)
  if FLAGS.features:
    cfg.model.features = tuple(int(v) for v in FLAGS.features)
  cfg.model.dtype, cfg.num_seeds, cfg.batch_size = dtype, k, FLAGS.batch
  cfg.seed_data_order = FLAGS.order if k > 1 else 'shared'
  cfg.data.on_device, cfg.data.extra_melanomas = on_device, ''
  cfg.data.name = FLAGS.data
  cfg.data.synthetic.num_train = FLAGS.num_train
  cfg.data.manual_dir, cfg.data.data_dir = FLAGS.manual_dir, FLAGS.data_dir
  return cfg


def flops_of(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', 0.0))


class Row:
  """One model x dtype x K x input mode: compile, warm up, time."""

  def __init__(self, name, cfg, mode, split, variant=contextlib.nullcontext, label=None):
    self.name, self.cfg, self.mode = label or name, cfg, mode
    self.mesh = parallel.make_mesh(cfg)
    k = cfg.num_seeds
    model = models.create_model(cfg.model)
    tx = steps.create_optimizer(cfg, 1000)
    self.variant = variant
    with variant():
      self.state = steps.create_train_state(model, tx, steps.member_keys(FLAGS.seed, k),
                                            tuple(cfg.data.image_size),
                                            sharding=parallel.state_sharding(self.mesh))
      self.input = device_input.TrainInput(split, cfg, self.mesh)
      self.step = steps.make_train_step(
          model, tx, loss=losses.LossConfig.from_config(cfg.loss),
          shared_batch=cfg.seed_data_order == 'shared', mesh=self.mesh, inputs=self.input.inputs)
      first = next(self.input)
      t = time.perf_counter()
      self.compiled = self.step.lower(self.state, first).compile()
      self.compile_s = time.perf_counter() - t
    self.flops_per_image = flops_of(self.compiled) / (k * cfg.batch_size)
    self.batches = (lambda: first) if mode == 'constant' else (lambda: next(self.input))
    self.model, self.images_per_step = model, k * cfg.batch_size

  def run(self, n: int) -> float:
    """Seconds for n steps (the last one's metrics read back)."""
    inputs = self.input.inputs
    t = time.perf_counter()
    metrics = None
    for _ in range(n):
      self.state, metrics = self.compiled(self.state, self.batches(), inputs)
    jax.block_until_ready(metrics)
    return time.perf_counter() - t

  def measure(self) -> dict:
    self.run(FLAGS.warmup)
    seconds = self.run(FLAGS.steps)
    self.input.close()
    ips = FLAGS.steps * self.images_per_step / seconds
    k = self.cfg.num_seeds
    row = {'model': self.name, 'dtype': self.cfg.model.dtype, 'members': k, 'input': self.mode,
           'images_per_s': ips, 'images_per_s_per_member': ips / k,
           'step_ms': 1000 * seconds / FLAGS.steps, 'compile_s': self.compile_s,
           'gflop_per_image': self.flops_per_image / 1e9,
           'tflops': ips * self.flops_per_image / 1e12}
    if FLAGS.peak_tflops:
      row['utilisation'] = row['tflops'] / FLAGS.peak_tflops
    return row

  def latency(self, batch: int, rng) -> float:
    """Median ms of `steps.predict` for member 0 on `batch` uint8 images."""
    variables = {'params': steps.member(self.state.params, 0),
                 'batch_stats': steps.member(self.state.batch_stats, 0)}
    variables = jax.device_put(parallel.to_local(variables))
    images = jax.device_put(random_batch(batch, tuple(self.cfg.data.image_size), rng)['image'])
    with self.variant():
      predict = jax.jit(lambda v, x: steps.predict(v, x, model=self.model)).lower(
          variables, images).compile()
    jax.block_until_ready(predict(variables, images))
    times = []
    for _ in range(FLAGS.infer_runs):
      t = time.perf_counter()
      jax.block_until_ready(predict(variables, images))
      times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def monai_rows(size, rng) -> tuple[list[dict], list[dict]]:
  try:
    import monai  # pylint: disable=g-import-not-at-top,unused-import
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(f'--monai: skipped ({e}).')
    return [], []
  net = DynUNet(size, FLAGS.batch, rng, seed=FLAGS.seed, amp=torch.cuda.is_available())
  t = time.perf_counter()
  net.train_steps(FLAGS.warmup)
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  net.train_steps(FLAGS.steps)
  seconds = time.perf_counter() - t
  ips = FLAGS.steps * FLAGS.batch / seconds
  row = {'model': net.name, 'dtype': net.dtype, 'members': 1, 'input': 'constant',
         'images_per_s': ips, 'images_per_s_per_member': ips,
         'step_ms': 1000 * seconds / FLAGS.steps, 'compile_s': compile_s,
         'torch': torch.__version__, 'monai': monai.__version__}
  lat = []
  for b in (int(v) for v in FLAGS.infer_batches):
    run = net.infer_fn(b, rng)
    run()
    times = []
    for _ in range(FLAGS.infer_runs):
      t = time.perf_counter()
      run()
      times.append(1000 * (time.perf_counter() - t))
    lat.append({'model': net.name, 'dtype': net.dtype, 'batch': b,
                'ms': statistics.median(times)})
  return [row], lat


def _fmt(v, digits=1):
  return '' if v is None else (f'{v:.{digits}f}' if isinstance(v, float) else str(v))


def print_tables(rows, latencies):
  constant = {(r['model'], r['dtype'], r['members']): r['images_per_s'] for r in rows
              if r['input'] == 'constant'}
  cols = ['model', 'dtype', 'K', 'input', 'images/s', 'per member', 'step ms', 'vs constant',
          'GFLOP/image', 'TFLOP/s', 'utilisation', 'compile s']
  print('\n| ' + ' | '.join(cols) + ' |\n|' + ' --- |' * len(cols))
  for r in rows:
    base = constant.get((r['model'], r['dtype'], r['members']))
    cells = [r['model'], r['dtype'], r['members'], r['input'], _fmt(r['images_per_s']),
             _fmt(r['images_per_s_per_member']), _fmt(r['step_ms'], 2),
             _fmt(r['images_per_s'] / base, 3) if base else '',
             _fmt(r.get('gflop_per_image'), 2), _fmt(r.get('tflops'), 2),
             f"{100 * r['utilisation']:.1f} %" if 'utilisation' in r else '',
             _fmt(r['compile_s'])]
    print('| ' + ' | '.join(str(c) for c in cells) + ' |')
  if latencies:
    print('\n| model | dtype | inference batch | latency ms |\n| --- | --- | --- | --- |')
    for r in latencies:
      print(f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['ms']:.2f} |")


def plan() -> list[tuple[str, str, int, str]]:
  if FLAGS.rows:
    out = []
    for spec in FLAGS.rows:
      model, dtype, k, mode = spec.split('/')
      out.append((model, dtype, int(k), mode))
    return out
  return [(model, dtype, k, mode) for model in FLAGS.models for dtype in FLAGS.dtypes
          for k in (int(v) for v in FLAGS.members) for mode in FLAGS.inputs
          if mode == 'constant' or str(k) in FLAGS.input_members]


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  start = time.perf_counter()
  env = environment()
  print(json.dumps(env))
  rng = np.random.default_rng(FLAGS.seed)
  rows, latencies, splits, skipped = [], [], {}, []
  if FLAGS.monai:
    size = tuple(int(v) for v in FLAGS.image_size) if FLAGS.image_size else (192, 256)
    rows, latencies = monai_rows(size, rng)
    for r in rows + latencies:
      print(json.dumps(r), flush=True)
  for name, dtype, k, mode in plan():
    if FLAGS.time_budget_s and time.perf_counter() - start > FLAGS.time_budget_s:
      skipped.append(f'{name}/{dtype}/{k}/{mode}')
      continue
    cfg = make_config(name, dtype, k, 'on' if mode == 'resident' else 'off')
    key = (cfg.data.name, tuple(cfg.data.image_size))
    if key not in splits:
      splits[key] = input_pipeline.get_split(cfg.data, 'train')
    if mode == 'convtranspose':
      if cfg.model.arch != 'mtl':
        continue
      import conv_variants  # pylint: disable=g-import-not-at-top
      row = Row(name, cfg, mode, splits[key], lambda: conv_variants.flax_upconv(True),
                label=f'{name} (flax ConvTranspose)')
    else:
      row = Row(name, cfg, mode, splits[key])
    rows.append(row.measure())
    print(json.dumps(rows[-1]), flush=True)
    if mode == 'constant' and k == 1:
      for b in (int(v) for v in FLAGS.infer_batches):
        latencies.append({'model': name, 'dtype': dtype, 'batch': b, 'ms': row.latency(b, rng)})
        print(json.dumps(latencies[-1]), flush=True)
  print_tables(rows, latencies)
  if skipped:
    print(f'\nskipped (past --time_budget_s={FLAGS.time_budget_s:g}): {", ".join(skipped)}')
  print(f'\ntotal {time.perf_counter() - start:.0f} s')
  if FLAGS.json:
    with open(FLAGS.json, 'w', encoding='utf-8') as f:
      json.dump({'environment': env, 'flags': {f: FLAGS[f].value for f in (
          'models', 'dtypes', 'members', 'inputs', 'input_members', 'rows', 'order', 'steps',
          'warmup', 'batch', 'image_size', 'features', 'data', 'peak_tflops')},
                 'training': rows, 'inference': latencies, 'skipped': skipped}, f, indent=1)


if __name__ == '__main__':
  app.run(main)
