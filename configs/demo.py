"""Demo: the full method (mtl3: attention pooling, joint reverse learning, CBAM) at a small size,
on the bundled synthetic dermoscopy data. Runs on a laptop CPU with no download.

    python -m skinmtl_jax.main --config=configs/demo.py --workdir=runs/demo

Expected (2 CPU cores): see README "Demo" for the measured time and metrics; the acceptance
floor is Dice >= 0.80 and ROC AUC >= 0.80 on the synthetic test split.
"""

from configs import mtl3


def get_config():
  c = mtl3.get_config()
  c.model.features = (8, 16, 32, 64, 96, 96)
  c.model.cls_hidden = 32
  c.data.name = 'synthetic'
  c.data.eval_sets = ('test',)
  c.data.image_size = (64, 96)
  c.data.synthetic.num_train = 600
  c.data.synthetic.num_test = 200
  c.num_epochs = 3
  c.log_every_steps = 100
  c.checkpoint_every_steps = 500
  c.experiment = 'demo'
  return c
