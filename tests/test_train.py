"""Training: the loss falls, runs are deterministic, main writes its artifacts and resumes."""

import functools
import json
import os
import re
import shutil

import jax
import numpy as np

from conftest import tiny_config
from helpers import assert_same_state, final_state, run_main
from skinmtl_jax import input_pipeline, models, steps


@functools.lru_cache
def _compiled(cfg_json, n):
  # One model, optimizer and jitted step per config, so repeated runs compile once.
  import ml_collections
  cfg = ml_collections.ConfigDict(json.loads(cfg_json))
  model = models.create_model(cfg.model)
  tx = steps.create_optimizer(cfg.optim, n)
  step = steps.make_train_step(model, tx, shared_batch=True)
  return model, tx, step


def _run_steps(cfg, n, batches=None):
  model, tx, step = _compiled(json.dumps({'model': cfg.model.to_dict(), 'optim': cfg.optim.to_dict(),
                                          'num_train_steps': n}), n)
  state = steps.create_train_state(model, tx, steps.member_keys(cfg.seed, 1),
                                   tuple(cfg.data.image_size))
  if batches is None:
    split = input_pipeline.get_split(cfg.data, 'train')
    ds, _ = input_pipeline.train_dataset(split, cfg.data, batch_size=cfg.batch_size, seed=0)
    it = iter(ds)
    batches = [next(it) for _ in range(n)]
  losses = []
  for b in batches:
    state, m = step(state, b)
    losses.append(float(m['loss'][0]))
  return state, losses, batches


def test_a_few_steps_on_one_batch_lower_the_loss():
  cfg = tiny_config('mtl2')
  split = input_pipeline.get_split(cfg.data, 'train')
  ds, _ = input_pipeline.train_dataset(split, cfg.data, batch_size=8, seed=0)
  batch = next(iter(ds))
  cfg.optim.learning_rate = cfg.optim.final_learning_rate = 3e-3
  _, losses, _ = _run_steps(cfg, 20, [batch] * 20)
  assert losses[-1] < 0.8 * losses[0], losses


def test_same_seed_gives_identical_parameters():
  cfg = tiny_config('mtl3')
  s1, _, batches = _run_steps(cfg, 3)
  s2, _, _ = _run_steps(cfg, 3, batches)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_array_equal(a, b)
  cfg.seed = 1
  s3, _, _ = _run_steps(cfg, 3, batches)
  assert not np.array_equal(jax.tree.leaves(s1.params)[0], jax.tree.leaves(s3.params)[0])


def test_learning_rate_decays_exponentially_from_initial_to_final():
  cfg = tiny_config()
  tx = steps.create_optimizer(cfg.optim, 100)
  state = tx.init({'w': np.zeros(1)})
  seen = []
  for _ in range(100):
    _, state = tx.update({'w': np.zeros(1)}, state)
    seen.append(float(state.hyperparams['learning_rate']))  # the rate the update just used
  expected = 3e-3 * 0.1 ** (np.arange(100) / 100)              # 3e-3 at step 0 -> 3e-4 at 100
  np.testing.assert_allclose(seen, expected, rtol=1e-5)


def test_main_end_to_end_writes_checkpoint_and_metrics(tmp_path):
  r = run_main(tmp_path / 'run', '--config.model.reverse=True',
               '--config.model.attention_pool=True')
  assert r.returncode == 0, r.stderr[-3000:]
  m = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
  assert m['params'] > 0 and m['steps'] == 6
  t = m['test']
  for k in ('dice', 'iou', 'mcc', 'f1_weighted', 'tpr_weighted', 'tnr', 'auc', 'confusion', 'n'):
    assert k in t, k
  assert t['n'] == 12 and np.sum(t['confusion']) == 12
  assert 0 <= t['dice'] <= 1
  assert sorted(os.listdir(tmp_path / 'run' / 'checkpoints')) == ['3', '6']
  rows = (tmp_path / 'run' / 'scalars.jsonl').read_text().splitlines()
  assert any('train/loss' in json.loads(r) for r in rows)
  assert (tmp_path / 'run' / 'per_image_test.csv').read_text().count('\n') == 13


def test_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
  r = run_main(tmp_path / 'full')
  assert r.returncode == 0, r.stderr[-3000:]
  # Pretend the run died after its step-3 checkpoint: drop the later one and run again.
  shutil.copytree(tmp_path / 'full', tmp_path / 'resumed')
  shutil.rmtree(tmp_path / 'resumed' / 'checkpoints' / '6')
  os.remove(tmp_path / 'resumed' / 'metrics.json')
  r = run_main(tmp_path / 'resumed')
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'Resumed from step 3' in r.stderr
  a, b = final_state(tmp_path / 'full'), final_state(tmp_path / 'resumed')
  assert steps.step_of(a) == steps.step_of(b) == 6
  assert_same_state(a, b)   # params, batch_stats and opt_state (and the step, checked above)
  full = json.loads((tmp_path / 'full' / 'metrics.json').read_text())
  resumed = json.loads((tmp_path / 'resumed' / 'metrics.json').read_text())
  assert full['test'] == resumed['test']


def test_paper_config_without_prepared_data_stops_with_instructions(tmp_path):
  r = run_main(tmp_path / 'run', f'--config.data.data_dir={tmp_path / "tfds"}',
               config='configs/mtl2.py')
  assert r.returncode != 0
  assert 'manual_dir' in r.stderr and 'isic2016' in r.stderr and 'challenge.isic-archive.com' in r.stderr
  assert 'Traceback' not in r.stderr


def test_bfloat16_mixed_precision_computes_in_bf16_and_keeps_float32_state():
  cfg = tiny_config('mtl2')
  cfg.model.dtype = 'bfloat16'
  cfg.optim.learning_rate = cfg.optim.final_learning_rate = 3e-3
  model = models.create_model(cfg.model)
  tx = steps.create_optimizer(cfg.optim, 8)
  state = steps.create_train_state(model, tx, steps.member_keys(0, 1), (32, 32))
  step = steps.make_train_step(model, tx, shared_batch=True)
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
           'mask': (rng.random((8, 32, 32)) > 0.5).astype(np.uint8),
           'label': np.array([0, 1] * 4, np.int32)}
  hlo = step.lower(state, batch).as_text()
  # The activations, so the convolutions' operands, are bfloat16 (whichever kernels run them:
  # XLA's, ours on AMX, or our float32 kernels on the bfloat16 values; tests/test_conv.py).
  assert re.search(r'tensor<\d+x\d+x\d+x\d+xbf16>', hlo)
  losses = []
  for _ in range(8):
    state, m = step(state, batch)
    losses.append(float(m['loss'][0]))
    assert m['loss'].dtype == np.float32
  assert all(x.dtype == np.float32 for x in jax.tree.leaves((state.params, state.batch_stats,
                                                              state.opt_state)) if
             np.issubdtype(x.dtype, np.floating))
  assert losses[-1] < 0.9 * losses[0], losses
