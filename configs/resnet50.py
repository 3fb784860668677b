"""Classification baseline (paper Table 3 row "Cls"): ResNet-50 trained from scratch.

    python -m skinmtl_jax.main --config=configs/resnet50.py --workdir=runs/resnet50 \
        --config.data.manual_dir=/path/to/downloads

Paper (23.84 M parameters; ours 23.78 M): ISIC 2016 test TPR 78.10, TNR 85.86, F1 78.26,
confusion B (261, 43) M (40, 35); PH2 F1 82.38. The paper does not say whether its ResNet-50
was pretrained; no pretrained weights can be downloaded here, so ours starts from scratch.
"""

from skinmtl_jax import config_base


def get_config(size: str = 'full'):
  """The config at `size`: 'full' (the paper's) or 'cpu' (config_base.sized)."""
  c = config_base.get_config()
  c.model.arch = 'resnet50'
  c.experiment = 'resnet50'
  return config_base.sized(c, size)
