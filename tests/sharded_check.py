"""Run by test_parallel.py in a subprocess with 4 forced host devices: trains the same steps on a
1-device mesh and on the 4-device mesh and prints, as JSON, how far the two states are apart."""

import json
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4')
os.environ['JAX_PLATFORMS'] = 'cpu'
sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from conftest import bias_before_batchnorm, tiny_config  # pylint: disable=wrong-import-position
from skinmtl_jax import input_pipeline, models, parallel, steps, train  # pylint: disable=wrong-import-position


def _batches(cfg, n):
  split = input_pipeline.get_split(cfg.data, 'train')
  shared = cfg.seed_data_order == 'shared'
  iters = [iter(input_pipeline.train_dataset(split, cfg.data, batch_size=cfg.batch_size,
                                             seed=i)[0]) for i in range(1 if shared else
                                                                        cfg.num_seeds)]
  out = []
  for _ in range(n):
    bs = [next(it) for it in iters]
    out.append(bs[0] if shared else {k: np.stack([b[k] for b in bs]) for k in bs[0]})
  return out


def _train(cfg, mesh, batches):
  shared = cfg.seed_data_order == 'shared'
  model = models.create_model(cfg.model)
  tx = steps.create_optimizer(cfg.optim, len(batches))
  state = steps.create_train_state(model, tx, steps.member_keys(cfg.seed, cfg.num_seeds),
                                   tuple(cfg.data.image_size),
                                   sharding=parallel.state_sharding(mesh))
  step = steps.make_train_step(model, tx, shared_batch=shared, mesh=mesh)
  sh = parallel.batch_sharding(mesh, shared)
  for b in batches:
    gb = jax.device_put(b, sh)
    state, metrics = step(state, gb)
  return state, metrics, gb


def compare(name, num_seeds, sharding, order, steps_=4):
  cfg = tiny_config(name)
  cfg.num_seeds, cfg.sharding, cfg.seed_data_order = num_seeds, sharding, order
  batches = _batches(cfg, steps_)
  shape = (cfg.sharding, cfg.num_seeds, cfg.batch_size)
  one, m1, _ = _train(cfg, parallel.make_mesh(*shape, jax.devices()[:1]), batches)
  mesh = parallel.make_mesh(*shape)
  four, m4, gb = _train(cfg, mesh, batches)
  lr = cfg.optim.learning_rate
  worst = {'param_rel': 0.0, 'bias_abs': 0.0, 'stats_abs': 0.0}
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path((four.params, four.batch_stats)),
                          jax.tree.leaves((one.params, one.batch_stats))):
    x, y = np.asarray(x), np.asarray(y)
    d = np.abs(x - y)
    if bias_before_batchnorm(path):
      worst['bias_abs'] = max(worst['bias_abs'], float(d.max()) / lr)
    elif jax.tree_util.keystr(path).startswith('[1]'):
      worst['stats_abs'] = max(worst['stats_abs'], float(d.max()) / lr)
    else:
      # Relative to one Adam step where the parameter is small.
      worst['param_rel'] = max(worst['param_rel'],
                               float(np.max(d / (np.abs(y) + lr))))
  leaf = jax.tree.leaves(four.params)[0]
  return {'name': f'{name} K={num_seeds} {sharding} {order}', 'mesh': dict(mesh.shape),
          'state_devices': len(leaf.sharding.device_set),
          'state_shard_shape': list(leaf.addressable_shards[0].data.shape),
          'state_shape': list(leaf.shape),
          'batch_shard_shape': list(gb['image'].addressable_shards[0].data.shape),
          'loss_one': np.asarray(m1['loss']).tolist(), 'loss_four': np.asarray(m4['loss']).tolist(),
          **worst}


def end_to_end(workdir):
  """main's loop on the 4-device mesh with members on it: trains with the gradient study,
  checkpoints, evaluates; returns the evaluation."""
  cfg = tiny_config()
  cfg.num_seeds, cfg.sharding, cfg.num_train_steps, cfg.grad_study_every_steps = 2, 'members', 2, 2
  return train.train_and_evaluate(cfg, workdir)['test']


if __name__ == '__main__':
  assert jax.device_count() == 4, jax.devices()
  cases = [('tiny', 1, 'data', 'shared'), ('tiny', 2, 'data', 'shared'),
           ('tiny', 2, 'members', 'per_member')]
  results = [compare(*c, steps_=3) for c in cases]
  e2e = end_to_end(sys.argv[1]) if len(sys.argv) > 1 else None
  print('RESULT ' + json.dumps({'cases': results,
                                'e2e': None if e2e is None else {'dice': e2e['dice'],
                                                                 'auc': e2e['auc']}}))
