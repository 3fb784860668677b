"""The shared defaults of every config: the paper's settings (§3.2, §3.4.4) and mtl0's model.

Config files in `configs/` start from `get_config()` here and change what their experiment
changes. Every number the paper gives is a field with the paper's value.
"""

from __future__ import annotations

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
  # Compute dtype. 'bfloat16' is mixed precision (for GPUs): convolutions and activations in
  # bfloat16; parameters, BatchNorm statistics, the classifier, the losses and the optimizer in
  # float32.
  m.dtype = 'float32'

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
  # Every N steps, the gradient study (skinmtl_jax/grad_study.py) on the training batch goes to
  # the summaries and workdir/grad_study.csv; 0 turns it off.
  c.grad_study_every_steps = 0
  c.checkpoint_every_steps = 1000
  c.max_checkpoints_to_keep = 3
  return c


# The sizes of every paper config, chosen after the colon: `--config=configs/mtl3.py:cpu`.
SIZES = ('full', 'cpu')


def sized(c: ml_collections.ConfigDict, size: str | None) -> ml_collections.ConfigDict:
  """`c` at `size`: 'full' (or '') leaves the paper's settings; 'cpu' is the same code at a size
  that trains on 2 CPU cores in minutes (the real-data study, docs/real_data_cpu.md):

    input 96x128 (paper 192x256), widths (16, 32, 64, 128, 160, 160) (half the paper's),
    classifier projections 64 wide (128), ResNet-50 width 16 (64), 2 epochs (50), and one
    checkpoint and log line about every 100 steps.

  The learning-rate schedule, losses, enlargement and everything else are the paper's. On the
  2-core machine of docs/real_data_cpu.md one seed of unet/mtl0-mtl3 trains in about 5 minutes
  and mtl4 (whose epochs are 1.7x longer) in about 9."""
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
  return c
