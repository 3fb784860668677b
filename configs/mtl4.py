"""MTL4 (paper Table 3 and Table 4): mtl3 trained with extra ISIC 2017 melanomas.

    python -m skinmtl_jax.main --config=configs/mtl4.py --workdir=runs/mtl4 \
        --config.data.manual_dir=/path/to/downloads

Paper (10.90 M parameters; ours 10.89 M): ISIC 2016 test TPR 80.74, TNR 81.58, F1 82.07,
MCC 85.46, IoU 82.46, DSC 89.48, confusion B (248, 56) M (17, 58); PH2 DSC 88.81, F1 85.50.
The paper's 404 extra melanomas include 63 ISIC 2016 test images (shared/data/README.md);
ours drops every image whose ISIC ID is in an evaluation set.
"""

from configs import mtl3
from skinmtl_jax import config_base


def get_config(size: str = 'full'):
  """The config at `size`: 'full' (the paper's) or 'cpu' (config_base.sized)."""
  c = mtl3.get_config()
  c.data.extra_melanomas = 'isic2017'
  c.experiment = 'mtl4'
  return config_base.sized(c, size)
