"""Segmentation baseline (paper Table 3 row "Seg"): the nnU-Net 2D U-Net alone, 10.71 M parameters.

    python -m skinmtl_jax.main --config=configs/unet.py --workdir=runs/unet \
        --config.data.manual_dir=/path/to/downloads

Paper: ISIC 2016 test DSC 91.04, IoU 84.62, MCC 87.06; PH2 DSC 88.56 (one run, no spread).
"""

from skinmtl_jax import config_base


def get_config(size: str = 'full'):
  """The config at `size`: 'full' (the paper's) or 'cpu' (config_base.sized)."""
  c = config_base.get_config()
  c.model.classify = False
  c.experiment = 'unet'
  return config_base.sized(c, size)
