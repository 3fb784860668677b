"""MTL1 (paper Table 3): + the decoder's last two levels, attended by the predicted lesion map,
pooled into the classifier.

    python -m skinmtl_jax.main --config=configs/mtl1.py --workdir=runs/mtl1 \
        --config.data.manual_dir=/path/to/downloads

Paper (10.80 M parameters; ours 10.79 M): ISIC 2016 test TPR 79.16, TNR 90.13, F1 77.96,
MCC 84.89, IoU 81.56, DSC 88.86; confusion B (274, 30) M (49, 26).
"""

from configs import mtl0
from skinmtl_jax import config_base


def get_config(size: str = 'full'):
  """The config at `size`: 'full' (the paper's) or 'cpu' (config_base.sized)."""
  c = mtl0.get_config()
  c.model.attention_pool = True
  c.experiment = 'mtl1'
  return config_base.sized(c, size)
