"""The shared defaults of every config: the paper's settings (§3.2, §3.4.4) and mtl0's model.

Config files in `configs/` start from `get_config()` here and change what their experiment
changes. Every number the paper gives is a field with the paper's value.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ml_collections


class ConfigError(ValueError):
  """A config asks for something that cannot be done; the message names the field."""


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = 'default'       # the config's name; reports put the paper's row beside ours
  c.seed = 0
  # Seed ensembles: K models trained at once by one vmapped step; member i is initialised from
  # seed + i. 'shared': all members read the same batches (ordered by data_seed); 'per_member':
  # member i reads its own order, seeded by data_seed + i.
  c.num_seeds = 1
  # How the step runs the members: 'auto' (jax.vmap on accelerators; unrolled on a CPU, where
  # vmapped convolutions are slow), 'vmap' or 'unroll'. The same results either way.
  c.member_loop = 'auto'
  c.seed_data_order = 'shared'
  c.data_seed = -1               # -1: the same as seed
  # Devices: 'data' splits each batch over all devices (state replicated); 'members' puts the
  # ensemble's member axis on the mesh too (see skinmtl_jax/parallel.py). One device: no change.
  c.sharding = 'data'

  # Model: mtl0 (shared encoder, classifier on the pooled bottleneck) at the paper's widths.
  c.model = m = ml_collections.ConfigDict()
  m.arch = 'mtl'                 # 'mtl' (U-Net family) or 'resnet50'
  m.features = (32, 64, 128, 256, 320, 320)  # nnU-Net 2D widths, shallow to deep
  m.classify = True              # False: segmentation only (the `unet` baseline)
  m.cls_hidden = 128             # units of each pooled source's projection in the classifier
  m.attention_pool = False       # mtl1: lesion-attended decoder features feed the classifier
  m.reverse = False              # mtl2: joint reverse learning (paper Eq. 2)
  m.reverse_mode = 'params'      # FC_cls^k reading: 'params' or 'activations'
  m.reverse_stop_gradient = False
  m.encoder_pool_levels = 1      # last encoder levels pooled into the classifier (mtl2: 2)
  m.cbam = False                 # mtl3: CBAM on those encoder levels
  # Woo et al. use 16; 8 gives the paper's parameter count for mtl3 (10.90 M).
  m.cbam_reduction = 8
  m.resnet_width = 64            # resnet50 only
  # Compute dtype. 'bfloat16' is mixed precision: convolutions and activations in bfloat16;
  # parameters, BatchNorm (statistics and arithmetic), the classifier, the losses and the
  # optimizer in float32. For GPUs, and for CPUs with AMX-BF16 (Intel Xeon since Sapphire
  # Rapids), where the convolutions run on its tile unit (skinmtl_jax/kernels/routing.py).
  # Evaluation and predict can run a float32 run in bfloat16 (their --dtype).
  m.dtype = 'float32'
  # The U-Net's convolutions, chosen once when the model is created (models/conv.py: select):
  # 'auto' is XLA's on GPUs and where the kernels are not built; on CPUs it routes each by shape
  # to the compiled kernels of skinmtl_jax/kernels (Winograd for 3x3 stride 1, im2col GEMMs) or
  # to XLA's (faster on CPUs: docs/cpu_speed.md). 'xla' is XLA's everywhere. The same values up
  # to float32 rounding.
  m.conv_impl = 'auto'

  # Loss (Eq. 3): lambda_1 Dice + lambda_2 cross-entropy.
  c.loss = ml_collections.ConfigDict()
  c.loss.dice_weight = 0.5
  c.loss.cls_weight = 0.5
  c.loss.dice_smooth = 1.0
  # How the two task gradients combine: 'weighted' (the fixed weights above, the paper) or
  # 'pcgrad' (Yu et al. 2020: conflicting task gradients projected before they are added).
  c.loss.balancing = 'weighted'

  # Adam; the learning rate decays exponentially from 3e-3 to 3e-4 over the run.
  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 3e-3
  c.optim.final_learning_rate = 3e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-7             # Keras' default; the paper used Keras

  c.batch_size = 10
  c.num_epochs = 50
  c.num_train_steps = -1         # > 0 overrides num_epochs
  c.eval_batch_size = 10
  c.threshold = 0.5              # melanoma decision and lesion mask threshold
  # The decision predict prints and its review flag (skinmtl_jax/uncertainty.py), fitted on the
  # validation split by evaluation (decision.json). The operating point: the threshold on the
  # melanoma probability that finds this share of the validation melanomas (0: the decision is
  # at `threshold`). review_share: the share of validation images whose members' masks agree
  # least, below which an image is flagged. seg_error_dice: a mask with a lower Dice counts as
  # an error when the flag is judged (report.md).
  c.decision = ml_collections.ConfigDict()
  c.decision.target_sensitivity = 0.9
  c.decision.review_share = 0.1
  c.decision.seg_error_dice = 0.7

  # Data: ISIC 2016 train, evaluated on ISIC 2016 test and PH2.
  c.data = d = ml_collections.ConfigDict()
  d.name = 'isic2016'            # training set: 'synthetic' or 'isic2016'
  d.manual_dir = ''              # folder with the user's downloads (archives or extracted)
  d.data_dir = ''                # where prepared datasets are stored
  d.image_size = (192, 256)      # (H, W)
  d.enlarge_benign = 4           # transforms per benign image (the 4 right-angle rotations)
  d.enlarge_melanoma = 16        # transforms per melanoma (all 16)
  d.extra_melanomas = ''         # mtl4: 'isic2017'
  # The paper added all 404 ISIC 2017 melanomas, 63 of which are ISIC 2016 test images. By
  # default those (and duplicates of training images) are dropped; True restores the paper's
  # protocol, warns, and marks metrics.json "trained_on_test_images": true.
  d.paper_protocol_train_on_test_images = False
  # The paper protocol's control (the real-data study's leakage comparison): the same number of
  # extra melanomas as the paper's protocol, hence its steps and melanoma share, with each image
  # of an evaluation set replaced by a training melanoma (see input_pipeline). No test image is
  # trained on; paper-protocol minus this is the leak's effect, this minus leak-free the budget's.
  d.paper_protocol_matched_control = False
  d.eval_sets = ('isic2016_test', 'ph2')
  # Share of the training images held out (stratified by class, chosen by ID, not enlarged) to
  # fit the calibration of the melanoma probability (a temperature and a bias, Platt scaling)
  # and to measure it; they are not trained on. 0: none (no calibration).
  d.validation_fraction = 0.1
  d.num_workers = 0              # grain worker processes (0: in the main process)
  # The training split on every device, gathered inside the step: 'auto' when it takes at most
  # on_device_fraction of one device's memory (the host's on a CPU), 'on', or 'off' (streamed).
  d.on_device = 'auto'
  d.on_device_fraction = 0.25
  d.prefetch_batches = 2         # batches loaded and put on the device ahead (0: none)
  d.synthetic = ml_collections.ConfigDict()
  d.synthetic.num_train = 1000
  d.synthetic.num_test = 200
  d.synthetic.melanoma_fraction = 0.3
  d.synthetic.seed = 0

  c.log_every_steps = 50
  # Every N epochs, the measures of the validation split (held out of training, see
  # data.validation_fraction) go to the log, scalars.jsonl and TensorBoard as validation/<measure>:
  # the learning curve that shows when training has levelled off. 0 turns it off.
  c.eval_every_epochs = 0
  # Every N steps, the gradient study (skinmtl_jax/grad_study.py) on the training batch goes to
  # the summaries and workdir/grad_study.csv; 0 turns it off.
  c.grad_study_every_steps = 0
  c.checkpoint_every_steps = 1000
  c.max_checkpoints_to_keep = 3
  return c


# ------------------------------------------------------------------------- per-field facts

class Field(NamedTuple):
  """What the code knows of a field besides its default value.

  choices: the allowed values (validate_config checks them; () for a field that is no choice).
  rerun: a rerun of a started run may change it (workdir.check_config): it does not touch the
    trained state, the order of the data or what the numbers mean.
  before: the value a run saved before the field existed behaved as, where that is not today's
    default (NEW otherwise): a saved config.json without the field reads it (`from_saved`), and
    a rerun compares against it, so that resuming an older run under the new default is refused,
    not silently changed.
  """
  choices: tuple = ()
  rerun: bool = False
  before: Any = None


NEW = None  # Field.before of a field whose older runs behaved as today's default


# Every field with a fact, in get_config's order. member_loop and model.conv_impl change how the
# step computes, not what (the same values up to float32 rounding), so a rerun may change them.
# data.validation_fraction changes the training set: older runs trained on every image.
FIELDS: dict[str, Field] = {
    'experiment': Field(rerun=True),
    'member_loop': Field(choices=('auto', 'vmap', 'unroll'), rerun=True),
    'seed_data_order': Field(choices=('shared', 'per_member')),
    'sharding': Field(choices=('data', 'members'), rerun=True),
    'model.arch': Field(choices=('mtl', 'resnet50')),
    'model.reverse_mode': Field(choices=('params', 'activations')),
    'model.encoder_pool_levels': Field(choices=(1, 2)),
    'model.dtype': Field(choices=('float32', 'bfloat16')),
    'model.conv_impl': Field(choices=('auto', 'xla'), rerun=True),
    'loss.balancing': Field(choices=('weighted', 'pcgrad')),
    'num_epochs': Field(rerun=True),
    'num_train_steps': Field(rerun=True),
    'eval_batch_size': Field(rerun=True),
    'threshold': Field(rerun=True),
    'decision.target_sensitivity': Field(rerun=True),
    'decision.review_share': Field(rerun=True),
    'decision.seg_error_dice': Field(rerun=True),
    'data.manual_dir': Field(rerun=True),
    'data.data_dir': Field(rerun=True),
    'data.extra_melanomas': Field(choices=('', 'isic2017')),
    'data.eval_sets': Field(rerun=True),
    'data.validation_fraction': Field(before=0.0),
    'data.num_workers': Field(rerun=True),
    'data.on_device': Field(choices=('auto', 'on', 'off'), rerun=True),
    'data.on_device_fraction': Field(rerun=True),
    'data.prefetch_batches': Field(rerun=True),
    'log_every_steps': Field(rerun=True),
    'eval_every_epochs': Field(rerun=True),
    'grad_study_every_steps': Field(rerun=True),
    'checkpoint_every_steps': Field(rerun=True),
    'max_checkpoints_to_keep': Field(rerun=True),
}

# Fields a rerun may change, and the values runs saved before a field existed behaved as.
CHANGEABLE = frozenset(k for k, f in FIELDS.items() if f.rerun)
BEFORE = {k: f.before for k, f in FIELDS.items() if f.before is not NEW}

# The choices that modules acting on them name in their messages.
ARCHITECTURES = FIELDS['model.arch'].choices
REVERSE_MODES = FIELDS['model.reverse_mode'].choices
DTYPES = FIELDS['model.dtype'].choices
NUM_TRANSFORMS = 16  # the enlargement's transforms (augment.py): data.enlarge_* in 1..16
# More members than this would not fit any one accelerator at the paper's size.
MAX_SEEDS = 64


def check_choice(name: str, value) -> None:
  """ConfigError naming the field unless `value` is one of FIELDS[name].choices: for library
  functions that take a choice as an argument, outside a validated config."""
  choices = FIELDS[name].choices
  if value not in choices:
    raise ConfigError(f'{name}={value!r}: expected one of {choices}.')


def _deep_merge(base: dict, over: dict) -> dict:
  out = dict(base)
  for k, v in over.items():
    out[k] = (_deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict)
              else v)
  return out


def _nest(flat: dict[str, Any]) -> dict:
  out = {}
  for name, v in flat.items():
    *groups, key = name.split('.')
    d = out
    for g in groups:
      d = d.setdefault(g, {})
    d[key] = v
  return out


def from_saved(saved: dict) -> ml_collections.ConfigDict:
  """A run's saved config (its config.json) on today's defaults, read once when the run is
  loaded: a field added since the run was saved reads the value the run behaved as
  (Field.before), or else today's default, so the code reads every field plainly. A field the
  code no longer has is kept."""
  merged = _deep_merge(get_config().to_dict(), _nest(BEFORE))
  return ml_collections.ConfigDict(_deep_merge(merged, saved))



# The sizes of every paper config, chosen after the colon: `--config=configs/mtl3.py:cpu`.
SIZES = ('full', 'cpu', 'study')


def sized(c: ml_collections.ConfigDict, size: str | None) -> ml_collections.ConfigDict:
  """`c` at `size`: 'full' (or '') leaves the paper's settings; 'cpu' is the same code at a size
  that trains on 2 CPU cores in minutes (the real-data study, docs/real_data_cpu.md):

    input 96x128 (paper 192x256), widths (16, 32, 64, 128, 160, 160) (half the paper's),
    classifier projections 64 wide (128), ResNet-50 width 16 (64), 2 epochs (50), and one
    checkpoint and log line about every 100 steps.

  'study' is the size of the controlled real-data study (docs/real_data_study.md), small
  enough to train every arm to a plateau with 3 seeds on 2 CPU cores:

    input 64x96, widths (8, 16, 32, 64, 80, 80) (a quarter of the paper's), classifier
    projections 32 wide, ResNet-50 width 8, 8 epochs (past where the pilot's validation curves
    levelled off, docs/real_data_study.md), the validation split's measures every epoch, a log
    line every 100 steps and a checkpoint every 200.

  The learning-rate schedule, losses, enlargement and everything else are the paper's."""
  size = size or 'full'
  if size not in SIZES:
    raise ConfigError(f'config size {size!r}: expected one of {SIZES} (after the colon in '
                      '--config=configs/NAME.py:SIZE).')
  if size == 'cpu':
    c.data.image_size = (96, 128)
    c.model.features = (16, 32, 64, 128, 160, 160)
    c.model.cls_hidden = 64
    c.model.resnet_width = 16
    c.num_epochs = 2
    c.log_every_steps = 100
    c.checkpoint_every_steps = 100
  elif size == 'study':
    c.data.image_size = (64, 96)
    c.model.features = (8, 16, 32, 64, 80, 80)
    c.model.cls_hidden = 32
    c.model.resnet_width = 8
    c.num_epochs = 8
    c.eval_every_epochs = 1
    c.log_every_steps = 100
    c.checkpoint_every_steps = 200
  return c


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Stops before any work on settings that make no sense, naming the field. A config saved
  before some fields existed is validated as `from_saved` loads it."""
  config = from_saved(config.to_dict())
  for name, field in FIELDS.items():
    if field.choices:
      group, _, key = name.rpartition('.')
      check_choice(name, (config[group] if group else config)[key])
  m = config.model
  if m.arch == 'resnet50' and (m.attention_pool or m.reverse or m.cbam):
    raise ConfigError('model.attention_pool / model.reverse / model.cbam need the U-Net '
                     '(model.arch="mtl"); resnet50 is the classification-only baseline.')
  if m.arch == 'mtl' and not m.classify and (m.attention_pool or m.reverse or m.cbam):
    raise ConfigError('model.attention_pool / model.reverse / model.cbam need the classifier; '
                     'set model.classify=True (the unet baseline has none).')
  for name in ('cls_hidden', 'cbam_reduction', 'resnet_width'):
    if not (isinstance(m[name], int) and m[name] >= 1):
      raise ConfigError(f'model.{name}={m[name]}: must be a positive integer.')
  if config.data.extra_melanomas and config.data.name != 'isic2016':
    raise ConfigError('data.extra_melanomas adds ISIC 2017 melanomas to ISIC 2016 training; '
                      f'data.name is {config.data.name!r}.')
  for name in ('enlarge_benign', 'enlarge_melanoma'):
    if not 1 <= config.data[name] <= NUM_TRANSFORMS:
      raise ConfigError(f'data.{name}={config.data[name]}: must be in 1..16 (the paper\'s '
                        f'transforms; benign 4, melanoma 16).')
  if config.num_seeds < 1:
    raise ConfigError(f'num_seeds={config.num_seeds} must be at least 1.')
  if config.loss.balancing == 'pcgrad' and not (m.arch == 'mtl' and m.classify):
    raise ConfigError('loss.balancing="pcgrad" balances two tasks; the model has one '
                      '(needs model.arch="mtl" and model.classify=True).')
  if config.eval_every_epochs < 0:
    raise ConfigError(f'eval_every_epochs={config.eval_every_epochs}: 0 (off) or a positive '
                      'number of epochs.')
  if config.data.paper_protocol_matched_control:
    if not config.data.extra_melanomas:
      raise ConfigError('data.paper_protocol_matched_control is the control of mtl4\'s extra '
                        'melanomas; set data.extra_melanomas="isic2017" (configs/mtl4.py).')
    if config.data.paper_protocol_train_on_test_images:
      raise ConfigError('data.paper_protocol_matched_control and '
                        'data.paper_protocol_train_on_test_images exclude each other: the '
                        'control replaces the test images the paper protocol trains on.')
  if config.grad_study_every_steps < 0:
    raise ConfigError(f'grad_study_every_steps={config.grad_study_every_steps}: 0 (off) or '
                      'a positive number of steps.')
  for name in ('batch_size', 'eval_batch_size'):
    if config[name] < 1:
      raise ConfigError(f'{name}={config[name]} must be positive.')
  # What otherwise trains nothing, keeps nothing or divides by zero after compiling.
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ConfigError(f'num_epochs={config.num_epochs} with num_train_steps='
                      f'{config.num_train_steps}: set a positive number of epochs or steps.')
  for name in ('max_checkpoints_to_keep', 'checkpoint_every_steps', 'log_every_steps'):
    if config[name] < 1:
      raise ConfigError(f'{name}={config[name]} must be at least 1.')
  for name in ('learning_rate', 'final_learning_rate'):
    if not config.optim[name] > 0:
      raise ConfigError(f'optim.{name}={config.optim[name]} must be positive.')
  if not 0 < config.threshold < 1:
    raise ConfigError(f'threshold={config.threshold} must be between 0 and 1 (exclusive).')
  decision = config.decision
  if not 0 <= decision.target_sensitivity <= 1:
    raise ConfigError(f'decision.target_sensitivity={decision.target_sensitivity}: the share of '
                      'validation melanomas the operating point finds, in [0, 1] (0: decide at '
                      'threshold).')
  if not 0 < decision.review_share < 1:
    raise ConfigError(f'decision.review_share={decision.review_share}: a share of the validation '
                      'images in (0, 1).')
  if not 0 < decision.seg_error_dice <= 1:
    raise ConfigError(f'decision.seg_error_dice={decision.seg_error_dice}: a Dice in (0, 1].')
  size = tuple(config.data.image_size)
  if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
    raise ConfigError(f'data.image_size={size}: expected two positive integers (H, W).')
  if m.arch == 'mtl':
    if len(m.features) < 3 or not all(isinstance(f, int) and f > 0 for f in m.features):
      raise ConfigError(f'model.features={tuple(m.features)}: expected three or more positive '
                        'widths, shallow to deep.')
    down = 2 ** (len(m.features) - 1)  # the first stage keeps the size, each other halves it
    if any(v % down for v in size):
      raise ConfigError(f'data.image_size={size}: the U-Net of {len(m.features)} levels '
                        f'(model.features) halves it {len(m.features) - 1} times, so H and W '
                        f'must be multiples of {down}.')
  d = config.data
  if not 0 < d.on_device_fraction <= 1:
    raise ConfigError(f'data.on_device_fraction={d.on_device_fraction}: a share of device '
                      'memory in (0, 1].')
  if not 0 <= d.validation_fraction <= 0.5:
    raise ConfigError(f'data.validation_fraction={d.validation_fraction}: a share of the '
                      'training images in [0, 0.5] (0: no validation split, no calibration).')
  if d.prefetch_batches < 0:
    raise ConfigError(f'data.prefetch_batches={d.prefetch_batches}: 0 (no prefetch) or more.')
  if config.num_seeds > MAX_SEEDS:
    raise ConfigError(f'num_seeds={config.num_seeds}: at most {MAX_SEEDS} members are trained '
                      'at once (each holds its own weights, Adam state and activations); run '
                      'several jobs with different seeds instead.')
