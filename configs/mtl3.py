"""MTL3 (paper Table 3): + CBAM on the last two encoder levels before they feed the classifier.

    python -m skinmtl_jax.main --config=configs/mtl3.py --workdir=runs/mtl3 \
        --config.data.manual_dir=/path/to/downloads

Paper (10.90 M parameters; ours 10.89 M): ISIC 2016 test TPR 81.79, TNR 91.12, F1 81.79
(81.00 in the text), MCC 85.07, IoU 82.08, DSC 89.37; confusion B (277, 27) M (42, 33).
"""

from configs import mtl2
from skinmtl_jax import config_base


def get_config(size: str = 'full'):
  """The config at `size`: 'full' (the paper's) or 'cpu' (config_base.sized)."""
  c = mtl2.get_config()
  c.model.cbam = True
  c.experiment = 'mtl3'
  return config_base.sized(c, size)
