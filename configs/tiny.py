"""A tiny config for tests and smoke runs: the same code at 32x32 with narrow widths.

    python -m skinmtl_jax.main --config=configs/tiny.py --workdir=/tmp/tiny

Expected: finishes in well under a minute on 2 CPU cores; the numbers mean nothing.
"""

from skinmtl_jax import config_base


def get_config():
  c = config_base.get_config()
  c.model.features = (4, 8, 8, 16)
  c.model.cls_hidden = 8
  c.model.resnet_width = 4
  c.data.name = 'synthetic'
  c.data.eval_sets = ('test',)
  c.data.image_size = (32, 32)
  c.data.enlarge_benign = 1
  c.data.enlarge_melanoma = 2
  c.data.synthetic.num_train = 24
  c.data.synthetic.num_test = 12
  c.batch_size = 4
  c.eval_batch_size = 5
  c.num_train_steps = 6
  c.log_every_steps = 2
  c.checkpoint_every_steps = 3
  c.experiment = 'tiny'
  return c
