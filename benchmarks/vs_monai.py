"""Our models against MONAI's DynUNet (the nnU-Net of MONAI): training throughput and
inference latency, on the same machine in the same run.

    pip install torch==2.13.0 && pip install -e '.[bench]'   # torch first: the CPU wheel
    python benchmarks/vs_monai.py [--models=unet,mtl4,dynunet] [--steps=3] [--warmup=1]
        [--infer_runs=5] [--infer_batches=1,32] [--flax_upconv=none|also]
        [--torch_threads=1,2] [--conv_impl=auto,xla] [--dtypes=float32,bfloat16]

Ours go through the code path training runs: `models.create_model(config.model)`,
`steps.create_optimizer`, `steps.create_train_state` and `steps.make_train_step` (jit of the
step vmapped over a member axis of size K = 1, donating the state), fed random uint8 images,
masks and labels. Inference is `steps.predict` (eval mode: running BatchNorm statistics),
jitted, on uint8 images. DynUNet has the same widths, strides and 2x2 transposed convolutions
(`filters=[32, 64, 128, 256, 320, 320]`, `norm_name='batch'`, no deep supervision) and trains
with Adam and `DiceCELoss(to_onehot_y=True, softmax=True)`; inference in `eval()` under
`torch.inference_mode()`. The conversion of uint8 images to floats is inside the timed step
for both.

Training: `--warmup` steps (the first compiles ours), then `--steps` timed steps, per model,
in `--rounds` rounds that visit the models in turn (other jobs may share the machine: the
interleaving keeps the ratios fair); images/s from the median round. Inference: per batch
size, one warm-up call, then the median of `--infer_runs` timed calls, also interleaved.
`--torch_threads=1,2` gives one DynUNet row per torch thread count; the ratios are against
the first. On a CPU shared with other jobs, torch's OpenMP threads wait on each other when one
of them is descheduled (measured on our 2-core machine with one core busy elsewhere: DynUNet
at 64x64, batch 10, 0.6 s per step with 1 thread, 5.4 s with 2), so compare with 1 thread
there, or run on an idle machine.

Runs on a GPU when there is one (torch on cuda, JAX on its default device).

`--conv_impl=auto,xla` gives each of our models one row per `model.conv_impl`: 'auto' (as the
configs are: on a CPU, the U-Net's convolutions routed to the compiled kernels of
`skinmtl_jax/kernels` where XLA's are slow, `skinmtl_jax/kernels/routing.py`) and 'xla' (XLA's
convolutions everywhere; the same values up to float32 summation order). The row names say
which ran.

`--dtypes=float32,bfloat16` gives every model one row per compute dtype: ours with
`model.dtype` (bfloat16: mixed precision; on a CPU with AMX-BF16 the convolutions run on its
tile unit, `kernels.conv2d_bf16`), DynUNet under torch's bfloat16 autocast (channels-last;
oneDNN's bfloat16 convolutions, AMX where present). Each row names its dtype; the ratios are
against the first DynUNet row.

`--flax_upconv=also` adds rows for our models with the decoder's former up-convolution,
flax's `nn.ConvTranspose`, in place of `UpConv2x2` (the same parameters and outputs; see
`benchmarks/conv_variants.py`).
"""

import functools
import importlib
import os
import statistics
import sys
import time

# Config files import their parents as `configs.*`: make the repository root importable.
_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # pylint: disable=g-import-not-at-top
import jax
import numpy as np

from skinmtl_jax import kernels, losses, models, steps
from dynunet import DynUNet, machine, random_batch  # pylint: disable=g-import-not-at-top

flags.DEFINE_list('models', ['unet', 'mtl4', 'dynunet'],
                  'Our configs (configs/<name>.py) and/or dynunet.')
flags.DEFINE_integer('steps', 3, 'Timed training steps per model and round.')
flags.DEFINE_integer('warmup', 1, 'Untimed training steps first (ours compile in the first).')
flags.DEFINE_integer('rounds', 1, 'Rounds of training measurements, models interleaved.')
flags.DEFINE_integer('batch', 10, 'Training batch size.')
flags.DEFINE_list('image_size', ['192', '256'], 'H,W.')
flags.DEFINE_list('infer_batches', ['1', '32'], 'Inference batch sizes.')
flags.DEFINE_integer('infer_runs', 5, 'Timed inference calls per batch size (median).')
flags.DEFINE_enum('flax_upconv', 'none', ['none', 'also'],
                  "'also': add our models with flax's nn.ConvTranspose as the decoder's "
                  "up-convolution, as before UpConv2x2 (benchmarks/conv_variants.py).")
flags.DEFINE_list('conv_impl', ['auto'],
                  'model.conv_impl of our rows, one row each: auto (the CPU kernels on CPUs) '
                  'and/or xla (XLA\'s convolutions).')
flags.DEFINE_list('torch_threads', [],
                  'DynUNet rows, one per torch thread count (default: one, torch\'s default). '
                  'On a shared machine torch\'s OpenMP threads slow down badly when another job '
                  'holds a core; compare 1 thread there.')
flags.DEFINE_list('dtypes', ['float32'],
                  'Compute dtypes (float32, bfloat16): one row per model and dtype.')
flags.DEFINE_integer('seed', 0, 'Seed of the random data and of the models.')
FLAGS = flags.FLAGS


def conv_impl_name(conv_impl: str, dtype: str = 'float32') -> str:
  """What `model.conv_impl` runs on the default device."""
  if conv_impl == 'auto' and jax.default_backend() == 'cpu':
    if not kernels.available():
      return f'XLA; CPU kernels {kernels.status()}'
    return 'CPU kernels' + (' and AMX' if dtype == 'bfloat16' and kernels.amx_available()
                            else '')
  return 'XLA'


class Ours:
  """One of our configs through the training code path."""

  def __init__(self, name, size, batch, rng, flax_upconv=False, conv_impl='auto',
               dtype='float32'):
    import conv_variants  # pylint: disable=g-import-not-at-top
    cfg = importlib.import_module(f'configs.{name}').get_config()
    cfg.model.conv_impl = conv_impl
    cfg.model.dtype = dtype
    self.dtype = dtype
    self.name = name + (' (flax ConvTranspose)' if flax_upconv else '') + (
        f' (convolutions: {conv_impl_name(conv_impl, dtype)}, {dtype})')
    self._variant = functools.partial(conv_variants.flax_upconv, flax_upconv)
    self.model = models.create_model(cfg.model)
    tx = steps.create_optimizer(cfg.optim, 1000)
    self.size = size
    with self._variant():
      self.state = steps.create_train_state(self.model, tx, steps.member_keys(FLAGS.seed, 1),
                                            size)
      self.step = steps.make_train_step(self.model, tx, shared_batch=True,
                                        loss=losses.LossConfig.from_config(cfg.loss))
    self.batch = jax.device_put(random_batch(batch, size, rng))
    self.predict = jax.jit(functools.partial(steps.predict, model=self.model))
    self.compile_s = 0.0

  def train_steps(self, n):
    with self._variant():  # traced (and compiled) on the first call
      for _ in range(n):
        t = time.perf_counter()
        self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready(metrics)
        if not self.compile_s:
          self.compile_s = time.perf_counter() - t

  def infer_fn(self, b, rng):
    images = jax.device_put(random_batch(b, self.size, rng)['image'])
    variables = {'params': steps.member(self.state.params, 0),
                 'batch_stats': steps.member(self.state.batch_stats, 0)}

    def run():
      with self._variant():
        jax.block_until_ready(self.predict(variables, images))
    return run


def main(argv):
  del argv
  size = tuple(int(v) for v in FLAGS.image_size)
  rng = np.random.default_rng(FLAGS.seed)
  print(f'machine: {machine()}')
  print(f'JAX {jax.__version__}, devices {jax.devices()}; '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  entries = []
  for name in FLAGS.models:
    if name == 'dynunet':
      import torch  # pylint: disable=g-import-not-at-top
      import monai  # pylint: disable=g-import-not-at-top
      print(f'torch {torch.__version__} ({"cuda" if torch.cuda.is_available() else "cpu"}, '
            f'{torch.get_num_threads()} threads by default), MONAI {monai.__version__}')
      for dtype in FLAGS.dtypes:
        for threads in FLAGS.torch_threads or [None]:
          entries.append(DynUNet(size, FLAGS.batch, rng, int(threads) if threads else None,
                                 seed=FLAGS.seed, amp=dtype == 'bfloat16'))
    else:
      for dtype in FLAGS.dtypes:
        for conv_impl in FLAGS.conv_impl:
          entries.append(Ours(name, size, FLAGS.batch, rng, conv_impl=conv_impl, dtype=dtype))
          if FLAGS.flax_upconv == 'also':
            entries.append(Ours(name, size, FLAGS.batch, rng, True, conv_impl, dtype))
  print(f'training: {size[0]}x{size[1]}, batch {FLAGS.batch}, {FLAGS.warmup} warm-up + '
        f'{FLAGS.steps} timed steps x {FLAGS.rounds} round(s); inference: batches '
        f'{",".join(FLAGS.infer_batches)}, 1 warm-up + median of {FLAGS.infer_runs}', flush=True)

  for e in entries:
    t = time.perf_counter()
    e.train_steps(FLAGS.warmup)
    print(f'  {e.name}: warm-up {time.perf_counter() - t:.1f} s (first step '
          f'{e.compile_s:.1f} s)', flush=True)
  rounds = {e.name: [] for e in entries}
  for _ in range(FLAGS.rounds):
    for e in entries:
      t = time.perf_counter()
      e.train_steps(FLAGS.steps)
      rounds[e.name].append(FLAGS.steps * FLAGS.batch / (time.perf_counter() - t))
      print(f'  {e.name}: {rounds[e.name][-1]:.2f} images/s', flush=True)
  throughput = {k: statistics.median(v) for k, v in rounds.items()}

  latency = {}
  for b in (int(v) for v in FLAGS.infer_batches):
    runs = {e.name: e.infer_fn(b, rng) for e in entries}
    for e in entries:
      runs[e.name]()  # warm-up (compiles ours)
    times = {e.name: [] for e in entries}
    for _ in range(FLAGS.infer_runs):
      for e in entries:
        t = time.perf_counter()
        runs[e.name]()
        times[e.name].append(1000 * (time.perf_counter() - t))
    for e in entries:
      latency[(e.name, b)] = statistics.median(times[e.name])
      print(f'  {e.name}: inference batch {b}: {latency[(e.name, b)]:.1f} ms', flush=True)

  ref = next((e.name for e in entries if isinstance(e, DynUNet)), None)
  bs = [int(v) for v in FLAGS.infer_batches]
  head = '| model | train images/s | ' + ' | '.join(f'infer ms, batch {b}' for b in bs)
  sep = '| --- | --- | ' + ' | '.join('---' for _ in bs)
  if ref:
    head += ' | train throughput vs DynUNet | ' + ' | '.join(
        f'latency vs DynUNet, batch {b}' for b in bs)
    sep += ' | --- | ' + ' | '.join('---' for _ in bs)
  print('\n' + head + ' |\n' + sep + ' |')
  for e in entries:
    row = f'| {e.name} | {throughput[e.name]:.2f} | ' + ' | '.join(
        f'{latency[(e.name, b)]:.1f}' for b in bs)
    if ref:
      row += f' | {throughput[e.name] / throughput[ref]:.2f} | ' + ' | '.join(
          f'{latency[(e.name, b)] / latency[(ref, b)]:.2f}' for b in bs)
    print(row + ' |')
  if ref:
    print('\nthroughput ratio: ours / DynUNet images/s (above 1: ours trains faster); latency '
          'ratio: ours / DynUNet ms (above 1: ours is slower).')


if __name__ == '__main__':
  app.run(main)
