"""Shared defaults: the paper's training settings with the mtl0 model (see skinmtl_jax/config_base.py).

    python -m skinmtl_jax.main --config=configs/default.py --workdir=runs/default
"""

from skinmtl_jax import config_base


def get_config(size: str = 'full'):
  """The config at `size`: 'full' (the paper's) or 'cpu' (config_base.sized)."""
  return config_base.sized(config_base.get_config(), size)
