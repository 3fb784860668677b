"""Shared defaults: the paper's training settings with the mtl0 model (see skinmtl_jax/config_base.py).

    python -m skinmtl_jax.main --config=configs/default.py --workdir=runs/default
"""

from skinmtl_jax import config_base


def get_config():
  return config_base.get_config()
