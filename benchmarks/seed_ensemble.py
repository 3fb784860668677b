"""Seed ensembles: time per training step of K members in one step, the members vmapped or
unrolled in the program (`steps.over_members`), against K sequential single-member steps,
for K = 1, 2, 4, 8.

    python benchmarks/seed_ensemble.py [--config=configs/demo.py] [--steps=20]
        [--member_loops=vmap,unroll]

Prints a table; the speed-up is the time of K sequential single-member steps over the
K-member step's time, measured in the same run (above 1: the ensemble step is faster).
"""

import functools
import os
import sys
import time

from absl import app, flags
import jax
from ml_collections import config_flags

from skinmtl_jax import input_pipeline, models, steps

# Config files import their parents as `configs.*`: make the repository root importable.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Model and data config.')
flags.DEFINE_integer('steps', 20, 'Timed steps per setting (after 2 warm-up steps).')
flags.DEFINE_list('ks', ['1', '2', '4', '8'], 'Ensemble sizes.')
flags.DEFINE_list('member_loops', ['vmap', 'unroll'], 'How the K-member step runs its members.')
FLAGS = flags.FLAGS


def _time(step, state, batch, n):
  for _ in range(2):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(n):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  return (time.perf_counter() - t) / n


def main(argv):
  del argv
  cfg = FLAGS.config
  split = input_pipeline.get_split(cfg.data, 'train')
  ds, _ = input_pipeline.train_dataset(split, cfg.data, batch_size=cfg.batch_size, seed=0)
  batch = next(iter(ds))
  model = models.create_model(cfg.model)
  tx = steps.create_optimizer(cfg.optim, 1000)
  make = functools.partial(steps.make_train_step, model, tx, shared_batch=True)
  size = tuple(cfg.data.image_size)
  # One member: the plain step (unrolling one member is no loop at all).
  single = _time(make(member_loop='unroll'),
                 steps.create_train_state(model, tx, steps.member_keys(0, 1), size), batch,
                 FLAGS.steps)
  print(f'{cfg.experiment}: {size[0]}x{size[1]}, batch {cfg.batch_size}, '
        f'{jax.devices()[0].device_kind}; one member: {1000 * single:.1f} ms/step')
  print('| K | members | K sequential single steps, ms | K-member step, ms | per member vs one '
        '| speed-up |')
  print('| --- | --- | --- | --- | --- | --- |')
  for k in (int(v) for v in FLAGS.ks):
    for loop in FLAGS.member_loops:
      t = _time(make(member_loop=loop),
                steps.create_train_state(model, tx, steps.member_keys(0, k), size), batch,
                FLAGS.steps)
      print(f'| {k} | {loop} | {1000 * k * single:.1f} | {1000 * t:.1f} | '
            f'{t / (k * single):.2f} | {k * single / t:.2f} |', flush=True)


if __name__ == '__main__':
  app.run(main)
