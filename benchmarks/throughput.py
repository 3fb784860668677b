"""Training throughput and inference latency of our models on this machine's accelerator (or
CPU), in one run and one table that is rewritten after every row.

    python benchmarks/throughput.py [--rows=SPEC,...] [--models=unet,mtl4]
        [--dtypes=float32,bfloat16] [--members=1,2,4,8] [--inputs=constant,resident,streamed]
        [--input_members=1] [--steps=20] [--warmup=2] [--time_budget_s=0]
        [--json=PATH] [--md=PATH] [--keep=PATH] [--fail_row=SPEC] [--peak_tflops=0]
        [--data=synthetic|isic2016 --manual_dir=DIR --data_dir=DIR]
        [--image_size=H,W] [--features=...] [--batch=10] [--monai]

Rows run in the order given, each in its own try/except: a failed row is recorded with its
error and the next one runs. The JSON (`--json`) and the markdown table (`--md`) are rewritten
(atomically) after every row, so whatever stops the run, the rows done are on disk. A row
starts only if the time since the process started plus its estimate (the last comparable
row's wall time, times K for an unrolled K-member row after a single one) fits
`--time_budget_s`; the others are listed as skipped. `--keep=PATH` takes the rows that
succeeded in an earlier run's JSON (same spec) instead of running them again.

A row spec is one of
  MODEL/DTYPE/K/MODE[/VARIANT]  a training step of configs/MODEL.py, K members, through the
        code path of `python -m skinmtl_jax.main`: `device_input.TrainInput` (grain pipeline,
        prefetch, global device batches) and `steps.make_train_step` (jit of the step over K
        members, the enlargement transforms inside it). MODE:
          constant   one batch, already on the device, fed again and again: the step alone;
          resident   data.on_device='on': the training split on the device, the pipeline
                     yields indices;
          streamed   data.on_device='off': uint8 images loaded and shipped every step;
          convtranspose  constant, with flax's nn.ConvTranspose as the up-convolution.
        VARIANT: vmap or unroll (member_loop; default 'auto': vmap on accelerators, unrolled
        on a CPU), highest (float32 matmuls and convolutions at 'highest' precision; without it
        float32 runs at JAX's default precision, which is TF32 on Ampere and Hopper GPUs),
        bf16bias (bfloat16 models with the convolution biases added in bfloat16 instead of
        float32; the up-convolution's bias stays float32).
  dynunet   MONAI's DynUNet (benchmarks/dynunet.py): on a GPU bfloat16 autocast, channels-last
            and cuDNN autotuning; on a CPU float32.
  matmul    the card's ceilings: an NxN bf16 matmul, and float32 at the default and at
            'highest' precision (a default well above 'highest' means TF32).
Without --rows: the product of --models, --dtypes, --members and --inputs (modes other than
constant for the K in --input_members), with `dynunet` first when --monai is given.

Columns: images/s in total and per member; the step's time; FLOPs per image three ways:
XLA's cost analysis of the lowered (pre-optimisation) program and of the compiled one (on GPUs
XLA hands convolutions to cuDNN, whose FLOPs its analysis may miss or get wrong), and an
analytic count, 3x the forward pass's convolutions and matmuls (traced from the model's own
jaxpr; for DynUNet torch's FlopCounterMode over a whole step). TFLOP/s and the utilisation use
the analytic count, against the dense peak of the card's own name (`device_kind`, NVIDIA's
datasheets: bf16 rows against bf16, float32 rows against TF32 or, at 'highest', plain fp32;
`--peak_tflops` overrides). Device memory: the compiled step's own footprint
(`memory_analysis`: arguments, outputs and temporaries, less donated buffers) and the
process's peak so far (`memory_stats`; JAX cannot reset it between rows); DynUNet's is torch's
peak for its row alone. Inference latency (`steps.predict`, one member, uint8 images in,
median of --infer_runs calls per batch size) is measured on the first training row only.

Sizes: `--image_size` and `--features` override the configs' (e.g. `--image_size=32,32
--features=4,8,8,16 --batch=4` for a dry run on a CPU); by default the paper's 192x256 and
widths 32...320.
"""

import time

_T0 = time.monotonic()  # the budget counts from here: the imports below take seconds

# pylint: disable=g-import-not-at-top,wrong-import-position
import contextlib
import dataclasses
import gc
import importlib
import json
import math
import os
import statistics
import sys
import traceback

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, '..'))   # configs/ import as `configs.*`
sys.path.insert(0, _HERE)

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from skinmtl_jax import device_input, input_pipeline, losses, models, parallel, steps
from dynunet import DynUNet, machine, random_batch

flags.DEFINE_list('models', ['unet', 'mtl4'], 'Configs (configs/<name>.py).')
flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'model.dtype of each row.')
flags.DEFINE_list('members', ['1', '2', '4', '8'], 'Ensemble sizes K (num_seeds).')
flags.DEFINE_list('inputs', ['constant', 'resident', 'streamed', 'convtranspose'],
                  'Input modes (see above).')
flags.DEFINE_list('input_members', ['1'], 'K for which the modes other than constant run.')
flags.DEFINE_list('rows', [], 'Explicit row specs (see above), run in this order.')
flags.DEFINE_float('time_budget_s', 0.0, 'Seconds from the process start within which the '
                   'rows must end: a row starts only if its estimate fits (0: no limit).')
flags.DEFINE_enum('order', 'shared', ['shared', 'per_member'],
                  'seed_data_order of K > 1 (per_member: each member reads its own batches).')
flags.DEFINE_integer('steps', 20, 'Timed training steps per row.')
flags.DEFINE_integer('warmup', 2, 'Untimed steps before (after compiling).')
flags.DEFINE_integer('batch', 10, 'Training batch size per member.')
flags.DEFINE_list('image_size', [], 'H,W (default: the config\'s).')
flags.DEFINE_list('features', [], 'Model widths, shallow to deep (default: the config\'s).')
flags.DEFINE_enum('data', 'synthetic', ['synthetic', 'isic2016'], 'Training data of the rows.')
flags.DEFINE_integer('num_train', 200, 'Synthetic training images.')
flags.DEFINE_string('manual_dir', '', 'data.manual_dir for --data=isic2016.')
flags.DEFINE_string('data_dir', '', 'data.data_dir for --data=isic2016.')
flags.DEFINE_list('infer_batches', ['1', '32'], 'Inference batch sizes.')
flags.DEFINE_integer('infer_runs', 10, 'Timed inference calls per batch size (median).')
flags.DEFINE_float('peak_tflops', 0.0, 'Peak of the device for the utilisation column (0: '
                   'from the card\'s name where it is known).')
flags.DEFINE_integer('matmul_n', 8192, 'Size of the `matmul` row\'s square matrices.')
flags.DEFINE_bool('monai', False, 'Without --rows: add MONAI\'s DynUNet first.')
flags.DEFINE_string('json', '', 'Write the rows, the machine and the flags here (after every '
                    'row).')
flags.DEFINE_string('md', '', 'Write the markdown tables here (after every row).')
flags.DEFINE_string('keep', '', 'An earlier run\'s JSON: its rows that succeeded are kept '
                    'instead of run again (same spec).')
flags.DEFINE_list('fail_row', [], 'Specs of rows that raise on purpose (training rows after '
                  'compiling), to test that a failed row leaves the others.')
flags.DEFINE_integer('epoch_examples', 7364, 'Enlarged training examples per epoch of the '
                     'paper\'s mtl4 run (on the carried data; the training log says), for the '
                     '50-epoch estimate.')
flags.DEFINE_integer('seed', 0, 'Seed of models and data.')
FLAGS = flags.FLAGS

# Dense (not sparse) peaks in TFLOP/s by NVIDIA's datasheets, by a substring of the card's
# device_kind, most specific first: 'H100 80GB HBM3' is the SXM part; an H200 ('NVIDIA H200')
# has the H100 SXM's rates. Measured here (KINDS.md): about 790 for a bf16 matmul on both.
PEAKS = (
    ('H100 PCIe', {'bfloat16': 756.5, 'tf32': 378.0, 'float32': 51.2}),
    ('H100 NVL', {'bfloat16': 835.5, 'tf32': 417.5, 'float32': 60.0}),
    ('H200 NVL', {'bfloat16': 835.5, 'tf32': 417.5, 'float32': 60.0}),
    ('H100', {'bfloat16': 989.4, 'tf32': 494.7, 'float32': 66.9}),
    ('H200', {'bfloat16': 989.4, 'tf32': 494.7, 'float32': 66.9}),
    ('A100', {'bfloat16': 312.0, 'tf32': 156.0, 'float32': 19.5}),
)
TARGETS = {'mtl4_k1': 2500.0, 'mtl4_k8': 6000.0, 'k8_vs_unrolled': 3.0, 'unet_vs_dynunet': 1.5,
           'paper_run_s': 180.0}


def elapsed() -> float:
  return time.monotonic() - _T0


def environment() -> dict:
  device = jax.devices()[0]
  env = {'machine': machine(), 'jax': jax.__version__, 'backend': jax.default_backend(),
         'device': getattr(device, 'device_kind', str(device)), 'devices': jax.device_count()}
  try:
    from jax.extend import backend as jax_backend
    env['platform_version'] = jax_backend.get_backend().platform_version
  except Exception:  # pylint: disable=broad-except  (informational only)
    pass
  stats = device.memory_stats() or {}
  if 'bytes_limit' in stats:
    env['device_memory_gb'] = round(stats['bytes_limit'] / 2**30, 1)
  return env


def peaks_for(device_kind: str) -> dict:
  """{'bfloat16', 'tf32', 'float32': dense TFLOP/s} of the card of that name, {} if unknown."""
  return next((dict(p) for name, p in PEAKS if name in device_kind), {})


def card_peaks() -> dict:
  """This card's peaks (`peaks_for` its device_kind); {} on CPUs."""
  if jax.default_backend() != 'gpu':
    return {}
  return peaks_for(getattr(jax.devices()[0], 'device_kind', ''))


def precision_of(dtype: str, variant: str) -> str:
  """The arithmetic of the row's convolutions, the key of its peak."""
  if dtype == 'bfloat16':
    return 'bfloat16'
  if variant == 'highest' or jax.default_backend() != 'gpu':
    return 'float32'
  return 'tf32'   # JAX's default precision for float32 dots and convolutions on these GPUs


@dataclasses.dataclass
class Spec:
  text: str
  kind: str                 # 'jax', 'dynunet' or 'matmul'
  model: str = ''
  dtype: str = ''
  k: int = 1
  mode: str = ''
  variant: str = ''


VARIANTS = ('', 'vmap', 'unroll', 'highest', 'bf16bias')
MODES = ('constant', 'resident', 'streamed', 'convtranspose')


def parse_spec(text: str) -> Spec:
  if text in ('dynunet', 'matmul'):
    return Spec(text, text)
  parts = text.split('/')
  if len(parts) not in (4, 5):
    raise ValueError(f'row {text!r}: expected MODEL/DTYPE/K/MODE[/VARIANT], dynunet or matmul')
  model, dtype, k, mode = parts[:4]
  variant = parts[4] if len(parts) == 5 else ''
  if mode not in MODES or variant not in VARIANTS or dtype not in ('float32', 'bfloat16'):
    raise ValueError(f'row {text!r}: mode in {MODES}, variant in {VARIANTS[1:]}, dtype '
                     'float32 or bfloat16')
  return Spec(text, 'jax', model, dtype, int(k), mode, variant)


def plan() -> list[Spec]:
  if FLAGS.rows:
    return [parse_spec(s) for s in FLAGS.rows]
  out = [parse_spec('dynunet')] if FLAGS.monai else []
  return out + [Spec(f'{m}/{d}/{k}/{mode}', 'jax', m, d, k, mode)
                for m in FLAGS.models for d in FLAGS.dtypes
                for k in (int(v) for v in FLAGS.members) for mode in FLAGS.inputs
                if mode == 'constant' or str(k) in FLAGS.input_members]


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


def _cost(analysis) -> float | None:
  """'flops' of a cost analysis (a dict, or a list of one per program), None if absent."""
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get('flops')
  return float(flops) if flops is not None and flops >= 0 else None


def _as_jaxpr(x):
  """The open jaxpr of a jaxpr or closed jaxpr (one class since JAX 0.11), else None."""
  if hasattr(x, 'eqns'):
    return x
  inner = getattr(x, 'jaxpr', None)
  return inner if hasattr(inner, 'eqns') else None


def _subjaxprs(params):
  for v in params.values():
    for x in (v if isinstance(v, (list, tuple)) else (v,)):
      sub = _as_jaxpr(x)
      if sub is not None:
        yield sub


def jaxpr_flops(jaxpr) -> tuple[float, int]:
  """(FLOPs, number) of the convolutions and matmuls in `jaxpr`, sub-jaxprs included."""
  flops, count = 0.0, 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      dn = eqn.params['dimension_numbers']
      kernel = math.prod(rhs[d] for d in dn.rhs_spec[2:]) * rhs[dn.rhs_spec[1]]
      flops += 2.0 * math.prod(eqn.outvars[0].aval.shape) * kernel
      count += 1
    elif name == 'dot_general':
      (contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      flops += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
      count += 1
    for sub in _subjaxprs(eqn.params):
      f, c = jaxpr_flops(sub)
      flops, count = flops + f, count + c
  return flops, count


def analytic_flops_per_image(model_cfg, state, image_size) -> tuple[float | None, int]:
  """3x the FLOPs of the forward pass's convolutions and matmuls for one image (forward, input
  gradient, kernel gradient), traced from the model with XLA's convolutions (model.conv_impl
  'xla': on a CPU 'auto' may call our kernels, which the count cannot see into):
  (FLOPs, operations counted)."""
  model_cfg = model_cfg.copy_and_resolve_references()
  if 'conv_impl' in model_cfg:
    model_cfg.conv_impl = 'xla'
  model = models.create_model(model_cfg)
  one = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), tree)
  variables = {'params': one(state.params), 'batch_stats': one(state.batch_stats)}
  x = jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32)
  fwd = lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])
  closed = jax.make_jaxpr(fwd)(variables, x)
  flops, count = jaxpr_flops(_as_jaxpr(closed))
  return (3.0 * flops if count else None), count


@contextlib.contextmanager
def bf16_biases():
  """While active, the convolutions that leave their bias in float32 (the model's
  `conv.promote_keep_params`) round it to the compute dtype with the input and the kernel, as
  flax does by default. Tracing must happen inside."""
  from flax.linen.dtypes import promote_dtype
  from skinmtl_jax.models import conv
  saved = conv.promote_keep_params
  conv.promote_keep_params = lambda *args, dtype=None, inexact=True: promote_dtype(
      *args, dtype=dtype, inexact=inexact)
  try:
    yield
  finally:
    conv.promote_keep_params = saved


def variant_context(spec: Spec):
  if spec.mode == 'convtranspose':
    import conv_variants
    return conv_variants.flax_upconv(True)
  if spec.variant == 'highest':
    return jax.default_matmul_precision('highest')
  if spec.variant == 'bf16bias':
    return bf16_biases()
  return contextlib.nullcontext()


def _mb(n) -> float | None:
  return None if n is None else round(n / 2**20, 1)


def device_memory() -> dict:
  stats = jax.devices()[0].memory_stats() or {}
  return {'device_peak_mb': _mb(stats.get('peak_bytes_in_use')),
          'device_in_use_mb': _mb(stats.get('bytes_in_use'))}


class Row:
  """One model x dtype x K x input mode (x variant): compile, warm up, time."""

  def __init__(self, spec: Spec, split):
    self.spec = spec
    on_device = 'on' if spec.mode == 'resident' else 'off'
    self.cfg = cfg = make_config(spec.model, spec.dtype, spec.k, on_device)
    self.mesh = parallel.make_mesh(cfg.sharding, cfg.num_seeds, cfg.batch_size)
    k = cfg.num_seeds
    self.member_loop = spec.variant if spec.variant in ('vmap', 'unroll') else 'auto'
    self.model = model = models.create_model(cfg.model)
    tx = steps.create_optimizer(cfg.optim, 1000)
    self.variant = lambda: variant_context(spec)
    with self.variant():
      self.state = steps.create_train_state(model, tx, steps.member_keys(FLAGS.seed, k),
                                            tuple(cfg.data.image_size),
                                            sharding=parallel.state_sharding(self.mesh))
      self.input = device_input.TrainInput(
          split, cfg.data, self.mesh, batch_size=cfg.batch_size, num_seeds=k,
          data_seed=cfg.seed if cfg.data_seed < 0 else cfg.data_seed,
          shared_order=cfg.seed_data_order == 'shared')
      self.step = steps.make_train_step(
          model, tx, loss=losses.LossConfig.from_config(cfg.loss),
          shared_batch=cfg.seed_data_order == 'shared', mesh=self.mesh, inputs=self.input.inputs,
          member_loop=self.member_loop)
      first = next(self.input)
      t = time.perf_counter()
      lowered = self.step.lower(self.state, first)
      self.compiled = lowered.compile()
      self.compile_s = time.perf_counter() - t
      # The analyses are extras: one that fails leaves its column empty, not the row.
      self.analysis_errors = []
      self.flops_lowered = self._try(lambda: _cost(lowered.cost_analysis()))
      self.analytic, self.counted = self._try(
          lambda: analytic_flops_per_image(cfg.model, self.state, tuple(cfg.data.image_size)),
          (None, 0))
    self.flops_compiled = self._try(lambda: _cost(self.compiled.cost_analysis()))
    self.memory = self._try(self.compiled.memory_analysis)
    self.batches = (lambda: first) if spec.mode in ('constant', 'convtranspose') else (
        lambda: next(self.input))
    self.images_per_step = k * cfg.batch_size

  def _try(self, fn, default=None):
    try:
      return fn()
    except Exception as e:  # pylint: disable=broad-except
      self.analysis_errors.append(f'{type(e).__name__}: {str(e)[:200]}')
      return default

  def run(self, n: int) -> float:
    """Seconds for n steps (the last one's metrics read back)."""
    inputs = self.input.inputs
    t = time.perf_counter()
    metrics = None
    for _ in range(n):
      self.state, metrics = self.compiled(self.state, self.batches(), inputs)
    jax.block_until_ready(metrics)
    return time.perf_counter() - t

  def measure(self, peaks: dict) -> dict:
    self.run(FLAGS.warmup)
    seconds = self.run(FLAGS.steps)
    ips = FLAGS.steps * self.images_per_step / seconds
    k, per_image = self.cfg.num_seeds, self.images_per_step
    precision = precision_of(self.spec.dtype, self.spec.variant)
    row = {'model': self.spec.model if self.spec.mode != 'convtranspose'
           else f'{self.spec.model} (flax ConvTranspose)',
           'dtype': self.spec.dtype, 'precision': precision, 'members': k,
           'input': self.spec.mode, 'member_loop': self.member_loop,
           'variant': self.spec.variant, 'images_per_s': ips, 'images_per_s_per_member': ips / k,
           'step_ms': 1000 * seconds / FLAGS.steps, 'compile_s': self.compile_s,
           'gflop_lowered': None if self.flops_lowered is None
           else self.flops_lowered / per_image / 1e9,
           'gflop_compiled': None if self.flops_compiled is None
           else self.flops_compiled / per_image / 1e9,
           'gflop_analytic': None if self.analytic is None else self.analytic / 1e9,
           'analytic_ops': self.counted}
    if self.analytic is not None:
      row['tflops'] = ips * self.analytic / 1e12
      peak = FLAGS.peak_tflops or peaks.get(precision)
      if peak:
        row['peak_tflops'] = peak
        row['utilisation'] = row['tflops'] / peak
    m = self.memory
    if m is not None:
      row['program_mb'] = _mb(m.argument_size_in_bytes + m.output_size_in_bytes
                              + m.temp_size_in_bytes - m.alias_size_in_bytes)
    row.update(self._try(device_memory, {}))
    if self.analysis_errors:
      row['analysis_errors'] = self.analysis_errors
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

  def close(self):
    self.input.close()


def dynunet_row(size, rng, peaks: dict) -> dict:
  """MONAI's DynUNet trained as benchmarks/dynunet.py says (bf16 autocast on a GPU)."""
  import monai
  import torch
  if jax.default_backend() == 'gpu' and not torch.cuda.is_available():
    raise RuntimeError('torch sees no GPU (it would train DynUNet on the CPU)')
  net = DynUNet(size, FLAGS.batch, rng, seed=FLAGS.seed, amp=torch.cuda.is_available())
  cuda = torch.cuda.is_available()
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  t = time.perf_counter()
  net.train_steps(max(FLAGS.warmup, 3))   # cuDNN's autotuner tries its algorithms here
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  net.train_steps(FLAGS.steps)
  seconds = time.perf_counter() - t
  ips = FLAGS.steps * FLAGS.batch / seconds
  row = {'model': net.name, 'dtype': net.dtype,
         'precision': 'bfloat16' if net.amp else ('tf32' if cuda and
                                                  torch.backends.cudnn.allow_tf32 else 'float32'),
         'members': 1, 'input': 'constant', 'member_loop': '', 'variant': '',
         'images_per_s': ips, 'images_per_s_per_member': ips,
         'step_ms': 1000 * seconds / FLAGS.steps, 'compile_s': compile_s,
         'torch': torch.__version__, 'monai': monai.__version__}
  try:   # FLOPs of one whole step (forward and backward), counted by torch
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
      net.train_steps(1)
    row['gflop_analytic'] = counter.get_total_flops() / FLAGS.batch / 1e9
    row['tflops'] = ips * row['gflop_analytic'] / 1e3
    peak = FLAGS.peak_tflops or peaks.get(row['precision'])
    if peak:
      row['peak_tflops'], row['utilisation'] = peak, row['tflops'] / peak
  except Exception as e:  # pylint: disable=broad-except  (FLOPs are extra)
    print(f'dynunet: no FLOP count ({type(e).__name__}: {e})', flush=True)
  if cuda:
    row['device_peak_mb'] = _mb(torch.cuda.max_memory_allocated())
  return row


def matmul_row(peaks: dict) -> dict:
  """TFLOP/s of an NxN matmul: bf16, and float32 at the default and 'highest' precision, on
  random data (never zeros), median of 10 calls after a warm-up."""
  n = FLAGS.matmul_n
  row = {'model': f'matmul {n}x{n}x{n}', 'members': 1, 'input': '', 'dtype': '',
         'member_loop': '', 'variant': ''}
  ka, kb = jax.random.split(jax.random.key(FLAGS.seed))
  for name, dtype, precision in (('bf16', jnp.bfloat16, None), ('f32_default', jnp.float32, None),
                                 ('f32_highest', jnp.float32, 'highest')):
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    f = jax.jit(lambda a, b, p=precision: jnp.matmul(a, b, precision=p))
    jax.block_until_ready(f(a, b))
    times = []
    for _ in range(10):
      t = time.perf_counter()
      jax.block_until_ready(f(a, b))
      times.append(time.perf_counter() - t)
    row[f'matmul_{name}_tflops'] = 2.0 * n**3 / statistics.median(times) / 1e12
  row['tf32_by_default'] = row['matmul_f32_default_tflops'] > 2 * row['matmul_f32_highest_tflops']
  if peaks:
    row['bf16_of_peak'] = row['matmul_bf16_tflops'] / peaks['bfloat16']
  return row


# ---------------------------------------------------------------------------------------------
# Output: the JSON and the markdown, rewritten after every row.


def _fmt(v, digits=1):
  if v is None or v == '':
    return ''
  return f'{v:,.{digits}f}' if isinstance(v, float) else str(v)


def _sig(v, digits=3):
  return '–' if v is None else f'{v:.{digits}g}'


def _write(path: str, text: str):
  if not path:
    return
  tmp = f'{path}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(tmp, path)   # whole files only, whatever kills the run


def _find(rows, spec_text):
  return next((r for r in rows if r['spec'] == spec_text and r['status'] == 'ok'), None)


def _first_ok(rows, **want):
  return next((r for r in rows if r['status'] == 'ok'
               and all(r.get(k) == v for k, v in want.items())), None)


def against_targets(rows, env) -> list[str]:
  """Lines comparing what the rows measured with the targets of issue 28 (full size only)."""
  one = _first_ok(rows, model='mtl4', dtype='bfloat16', members=1, input='resident', variant='')
  eight = (_first_ok(rows, model='mtl4', dtype='bfloat16', members=8, input='resident',
                     member_loop='vmap')
           or _first_ok(rows, model='mtl4', dtype='bfloat16', members=8, input='resident',
                        member_loop='auto'))
  unrolled = _first_ok(rows, model='mtl4', dtype='bfloat16', members=8, input='resident',
                       member_loop='unroll')
  unet = _first_ok(rows, model='unet', dtype='bfloat16', members=1, variant='')
  dyn = next((r for r in rows if r['status'] == 'ok' and r['spec'] == 'dynunet'), None)
  t = TARGETS
  out = []
  if one:
    ips = one['images_per_s']
    steps50 = 50 * (FLAGS.epoch_examples // FLAGS.batch)
    out.append(f'- mtl4 bf16, one member, data resident: {ips:,.0f} images/s '
               f'(target ≥ {t["mtl4_k1"]:,.0f})')
    out.append(f'- the paper\'s 50-epoch mtl4 run, its steps alone at that rate: {steps50:,} '
               f'steps x {FLAGS.batch} images / {ips:,.0f} = {steps50 * FLAGS.batch / ips:,.0f} s '
               f'(target ≤ {t["paper_run_s"]:.0f} s with start-up and evaluation; the training '
               'call measures the whole run)')
  if eight:
    line = (f'- mtl4 bf16 K = 8 ({eight["member_loop"]}): {eight["images_per_s"]:,.0f} images/s '
            f'in total (target ≥ {t["mtl4_k8"]:,.0f})')
    if unrolled:
      line += (f', {eight["images_per_s"] / unrolled["images_per_s"]:.2f}x the unrolled K = 8 '
               f'({unrolled["images_per_s"]:,.0f}; target ≥ {t["k8_vs_unrolled"]:.0f}x)')
    if one:
      line += (f', {eight["images_per_s"] / one["images_per_s"]:.2f}x one member (8 runs one '
               'after another)')
    out.append(line)
  if unet and dyn:
    out.append(f'- unet bf16: {unet["images_per_s"]:,.0f} images/s, '
               f'{unet["images_per_s"] / dyn["images_per_s"]:.2f}x DynUNet\'s '
               f'{dyn["images_per_s"]:,.0f} on the same card (target ≥ '
               f'{t["unet_vs_dynunet"]:.1f}x)')
  if out and tuple(int(v) for v in (FLAGS.image_size or (192, 256))) != (192, 256):
    out.insert(0, '- (not at the paper\'s 192x256: these are no measure of the targets)')
  return out


def markdown(doc: dict) -> str:
  env, rows = doc['environment'], doc['rows']
  lines = [f'# Throughput: {env.get("device")} ({env.get("backend")}, jax {env.get("jax")})',
           '', f'{env.get("machine")}; {env.get("platform_version", "")}'.strip('; '),
           f'{doc["elapsed_s"]:.0f} s since the start; '
           + ('complete.' if doc['complete'] else 'in progress or stopped.'), '']
  cols = ['row', 'status', 'precision', 'images/s', 'per member', 'step ms', 'GFLOP/img '
          'lowered / compiled / analytic', 'TFLOP/s', 'util.', 'step MB', 'device peak MB',
          'compile s', 'row s']
  lines += ['| ' + ' | '.join(cols) + ' |', '|' + ' --- |' * len(cols)]
  for r in rows:
    if r['status'] != 'ok':
      status = r['status'] + (f': {r["error"]}' if r.get('error') else '')
      if r['status'] == 'running' and not doc['complete']:
        status = 'running, or stopped by the time limit'
      cells = [r['spec'], status]
      cells += [''] * (len(cols) - 3) + [_fmt(r.get('wall_s'), 0)]
    elif r['spec'] == 'matmul':
      cells = [r['model'], 'ok', 'bf16 / f32 default / f32 highest',
               ' / '.join(_fmt(r[f'matmul_{n}_tflops']) + ' TFLOP/s'
                          for n in ('bf16', 'f32_default', 'f32_highest'))]
      cells += [f'TF32 by default: {"yes" if r["tf32_by_default"] else "no"}'] + [''] * (
          len(cols) - 6) + [_fmt(r.get('wall_s'), 0)]
    else:
      flops = ' / '.join(_sig(r.get(k)) for k in ('gflop_lowered', 'gflop_compiled',
                                                 'gflop_analytic'))
      cells = [r['spec'], 'ok' + (' (kept)' if r.get('kept') else ''), r.get('precision', ''),
               _fmt(r['images_per_s']), _fmt(r['images_per_s_per_member']),
               _fmt(r['step_ms'], 2), flops, _sig(r.get('tflops')),
               f'{100 * r["utilisation"]:.1f} %' if 'utilisation' in r else '',
               _fmt(r.get('program_mb'), 0), _fmt(r.get('device_peak_mb'), 0),
               _fmt(r.get('compile_s')), _fmt(r.get('wall_s'), 0)]
    lines.append('| ' + ' | '.join(str(c).replace('|', '/') for c in cells) + ' |')
  if doc['inference']:
    lines += ['', '| model | dtype | inference batch | latency ms |', '| --- | --- | --- | --- |']
    lines += [f'| {r["model"]} | {r["dtype"]} | {r["batch"]} | {r["ms"]:.2f} |'
              for r in doc['inference']]
  targets = against_targets(rows, env)
  if targets:
    lines += ['', '## Against the targets (issue 28)', ''] + targets
  lines += ['', '## Notes', ''] + [f'- {n}' for n in doc['notes']]
  return '\n'.join(lines) + '\n'


def notes(peaks: dict) -> list[str]:
  out = ['Rows in the order run; a row\'s images/s is K members x batch per step; "step MB" is '
         'the compiled step\'s arguments, outputs and temporaries less donated buffers; '
         '"device peak MB" is the process\'s peak so far (JAX cannot reset it), DynUNet\'s its '
         'own (torch).',
         'GFLOP/img: XLA\'s cost analysis before optimisation (lowered) and after (compiled; on '
         'GPUs it may miss cuDNN\'s convolutions), and the analytic count, 3x the forward '
         'pass\'s convolutions and matmuls; TFLOP/s and the utilisation use the analytic one.']
  if peaks:
    out.append(f'Peaks (dense, datasheet, by the card\'s name): bf16 {peaks["bfloat16"]}, '
               f'TF32 {peaks["tf32"]}, fp32 {peaks["float32"]} TFLOP/s; a bf16 matmul reaches '
               'about 790 on the cards lent here (the `matmul` row measures it).')
  if jax.default_backend() == 'gpu':
    out.append('float32 rows run at JAX\'s default precision: TF32 on this GPU (rows with '
               '/highest: full float32); the `matmul` row shows the difference.')
  elif not FLAGS.peak_tflops:
    out.append('No utilisation on this backend (no known peak; --peak_tflops sets one).')
  return out


# ---------------------------------------------------------------------------------------------


def estimate(spec: Spec, done: list[dict], stopped: dict | None = None) -> float:
  """Seconds the row is expected to take, from the rows timed so far on this machine (kept
  ones too; their inference latencies left out): a training row, the last one with the same K
  and member loop (unrolled or not), else K/2 times the last one-member row for an unrolled
  row (its compile grows with K; cuDNN's autotuning of the repeated layers does not), else the
  last training row; DynUNet, its last, else the last row's; matmul, its last, else 10 s; 0
  when nothing compares (the row starts). A row that an earlier run started and did not finish
  in the S seconds it had (`stopped`, from --keep) takes at least 1.25 S."""
  floor = 1.25 * (stopped or {}).get(spec.text, 0.0)
  timed = [r for r in done if r.get('wall_s') and r['status'] in ('ok', 'failed')]
  wall = lambda r: r['wall_s'] - r.get('latency_s', 0.0)
  if spec.kind != 'jax':
    same = [r for r in timed if r['spec'] == spec.kind]
    if same:
      return max(floor, wall(same[-1]))
    return max(floor, 10.0 if spec.kind == 'matmul' else (wall(timed[-1]) if timed else 0.0))
  rows = [r for r in timed if r.get('kind') == 'jax']
  unroll = spec.variant == 'unroll'
  same = [r for r in rows if r.get('members') == spec.k
          and (r.get('member_loop') == 'unroll') == unroll]
  ones = [r for r in rows if r.get('members') == 1]
  if same:
    guess = wall(same[-1])
  elif unroll and ones:
    guess = spec.k / 2 * wall(ones[-1])
  else:
    guess = wall(rows[-1]) if rows else 0.0
  return max(floor, guess)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  env = environment()
  print(json.dumps(env), flush=True)
  peaks = card_peaks()
  rng = np.random.default_rng(FLAGS.seed)
  specs = plan()
  kept, kept_inference, stopped = {}, [], {}
  if FLAGS.keep and os.path.exists(FLAGS.keep):
    with open(FLAGS.keep, encoding='utf-8') as f:
      old = json.load(f)
    if old.get('environment', {}).get('device') == env['device']:
      kept = {r['spec']: {**r, 'kept': True} for r in old.get('rows', []) if r['status'] == 'ok'}
      kept_inference = old.get('inference', [])
      # Rows still 'running' there were stopped by that call's time limit: they had this long.
      stopped = {r['spec']: r['seconds_left'] for r in old.get('rows', [])
                 if r['status'] == 'running' and r.get('seconds_left')}
    else:
      print(f'--keep={FLAGS.keep}: another device ({old.get("environment", {}).get("device")}); '
            'nothing kept.', flush=True)
  doc = {'environment': env, 'peaks': peaks, 'rows': [], 'inference': [], 'skipped': [],
         'notes': notes(peaks), 'elapsed_s': elapsed(), 'complete': False,
         'flags': {f: FLAGS[f].value for f in (
             'rows', 'order', 'steps', 'warmup', 'batch', 'image_size', 'features', 'data',
             'time_budget_s', 'fail_row', 'peak_tflops', 'keep')}}

  def save():
    doc['elapsed_s'] = elapsed()
    if FLAGS.json:
      _write(FLAGS.json, json.dumps(doc, indent=1))
    if FLAGS.md:
      _write(FLAGS.md, markdown(doc))

  splits = {}
  first_jax = next((i for i, s in enumerate(specs) if s.kind == 'jax'), None)
  for i, spec in enumerate(specs):
    if spec.text in kept:
      doc['rows'].append(kept[spec.text])
      if i == first_jax:
        doc['inference'] = kept_inference
      save()
      continue
    guess = estimate(spec, doc['rows'], stopped)
    if FLAGS.time_budget_s and elapsed() + guess > FLAGS.time_budget_s:
      doc['rows'].append({'spec': spec.text, 'kind': spec.kind, 'status': 'skipped',
                          'error': f'{elapsed():.0f} s + about {guess:.0f} s would pass the '
                                   f'budget of {FLAGS.time_budget_s:.0f} s'})
      doc['skipped'].append(spec.text)
      save()
      continue
    record = {'spec': spec.text, 'kind': spec.kind, 'status': 'running'}
    if FLAGS.time_budget_s:
      record['seconds_left'] = FLAGS.time_budget_s - elapsed()
    doc['rows'].append(record)
    save()   # a row killed by the caller's timeout stays 'running' in the files
    print(f'== row {spec.text} at {elapsed():.0f} s (estimate {guess:.0f} s)', flush=True)
    t = time.monotonic()
    row = None
    try:
      if spec.text in FLAGS.fail_row and spec.kind != 'jax':
        raise RuntimeError(f'deliberate failure of {spec.text} (--fail_row)')
      if spec.kind == 'matmul':
        record.update(matmul_row(peaks))
      elif spec.kind == 'dynunet':
        size = tuple(int(v) for v in FLAGS.image_size) if FLAGS.image_size else (192, 256)
        record.update(dynunet_row(size, rng, peaks))
      else:
        cfg = make_config(spec.model, spec.dtype, spec.k)
        key = (cfg.data.name, tuple(cfg.data.image_size))
        if key not in splits:
          splits[key] = input_pipeline.get_split(cfg.data, 'train')
        row = Row(spec, splits[key])
        if spec.text in FLAGS.fail_row:
          raise RuntimeError(f'deliberate failure of {spec.text} (--fail_row)')
        record.update(row.measure(peaks))
        if i == first_jax:
          t_latency = time.monotonic()
          for b in (int(v) for v in FLAGS.infer_batches):
            doc['inference'].append({'model': spec.model, 'dtype': spec.dtype, 'batch': b,
                                     'ms': row.latency(b, rng)})
            print(json.dumps(doc['inference'][-1]), flush=True)
          record['latency_s'] = time.monotonic() - t_latency
      record['status'] = 'ok'
    except Exception as e:  # pylint: disable=broad-except  (the next row runs anyway)
      record['status'] = 'failed'
      record['error'] = f'{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ""}'
      print(f'== row {spec.text} FAILED: {record["error"]}', flush=True)
      traceback.print_exc()
    finally:
      if row is not None:
        try:
          row.close()
        except Exception:  # pylint: disable=broad-except
          pass
      row = None
      gc.collect()   # the row's device buffers go before the next row
      record['wall_s'] = time.monotonic() - t
      save()
    print(json.dumps(record), flush=True)
  doc['complete'] = True
  save()
  print(markdown(doc), flush=True)


if __name__ == '__main__':
  app.run(main)
