"""MTL2 (paper Table 3): + joint reverse learning (Eq. 2) and the last two encoder levels
pooled into the classifier.

    python -m skinmtl_jax.main --config=configs/mtl2.py --workdir=runs/mtl2 \
        --config.data.manual_dir=/path/to/downloads

Variants: --config.model.reverse_mode=activations (image-dependent FC_cls^k),
--config.model.reverse_stop_gradient=True (no gradient through the reverse path).

Paper (10.86 M parameters; ours 10.84 M): ISIC 2016 test TPR 81.53, TNR 91.12, F1 80.66,
MCC 84.74, IoU 81.95, DSC 89.15; confusion B (277, 27) M (43, 32).
"""

from configs import mtl1
from skinmtl_jax import config_base


def get_config(size: str = 'full'):
  """The config at `size`: 'full' (the paper's) or 'cpu' (config_base.sized)."""
  c = mtl1.get_config()
  c.model.reverse = True
  c.model.encoder_pool_levels = 2
  c.experiment = 'mtl2'
  return config_base.sized(c, size)
