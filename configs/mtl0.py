"""MTL0 (paper Table 3): shared encoder, classifier on the pooled bottleneck; decoder unchanged.

    python -m skinmtl_jax.main --config=configs/mtl0.py --workdir=runs/mtl0 \
        --config.data.manual_dir=/path/to/downloads

Paper (10.76 M parameters; ours 10.76 M): ISIC 2016 test TPR 78.10, TNR 90.13, F1 76.52,
MCC 86.10, IoU 83.15, DSC 90.03; confusion B (274, 30) M (53, 22).
"""

from skinmtl_jax import config_base


def get_config(size: str = 'full'):
  """The config at `size`: 'full' (the paper's) or 'cpu' (config_base.sized)."""
  c = config_base.get_config()
  c.experiment = 'mtl0'
  return config_base.sized(c, size)
