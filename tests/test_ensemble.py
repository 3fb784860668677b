"""Seed ensembles: K members in one vmapped step, each the same model as a single run."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, bias_before_batchnorm, tiny_config
from skinmtl_jax import checkpointing, evaluate, input_pipeline, metrics, models, steps, train


def _train(cfg, num_steps):
  """Runs the training loop's own pieces for `num_steps` and returns the stacked state."""
  k = cfg.num_seeds
  split = input_pipeline.get_split(cfg.data, 'train')
  data_seed = cfg.seed if cfg.data_seed < 0 else cfg.data_seed
  shared = cfg.seed_data_order == 'shared'
  iters = [iter(input_pipeline.train_dataset(split, cfg.data, batch_size=cfg.batch_size,
                                             seed=data_seed + i)[0])
           for i in range(1 if shared else k)]
  model = models.create_model(cfg.model)
  tx = train.create_optimizer(cfg, num_steps)
  state = steps.create_train_state(model, tx, steps.member_keys(cfg.seed, k),
                                   tuple(cfg.data.image_size))
  step = steps.make_train_step(model, tx, dice_weight=0.5, cls_weight=0.5, dice_smooth=1.0,
                               shared_batch=shared)
  for _ in range(num_steps):
    batches = [next(it) for it in iters]
    batch = batches[0] if shared else {key: np.stack([b[key] for b in batches])
                                       for key in batches[0]}
    state, _ = step(state, batch)
  return state


@pytest.mark.parametrize('order', ['per_member', 'shared'])
def test_member_i_equals_a_single_run_with_its_seed(order):
  cfg = tiny_config('mtl2')
  cfg.num_seeds, cfg.seed_data_order, cfg.seed = 3, order, 5
  ensemble = _train(cfg, 4)
  for i in (2,):
    single_cfg = tiny_config('mtl2')
    single_cfg.seed = 5 + i
    # A shared order is the ensemble seed's order: give the single run that data seed.
    single_cfg.data_seed = 5 if order == 'shared' else -1
    single = _train(single_cfg, 4)
    a, b = steps.member(ensemble, i), steps.member(single, 0)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path((a.params, a.batch_stats)),
                            jax.tree.leaves((b.params, b.batch_stats))):
      if bias_before_batchnorm(path):
        # Its true gradient is exactly zero (BatchNorm removes any shift), so its gradient
        # is pure round-off, which Adam rescales to lr-sized steps: it cannot agree, and it
        # does not matter. It stays at the size of a few such steps.
        assert np.max(np.abs(x)) < 10 * cfg.optim.learning_rate
        continue
      # Running means of those layers' outputs carry the bias, so they agree to its size.
      # Elsewhere: Adam divides by the gradient's own scale, so where a gradient is tiny the
      # round-off of a differently ordered (vmapped) computation moves a parameter by up to a
      # few percent of one step (lr). A wrong key or data order differs by ~0.1.
      atol = 10 * cfg.optim.learning_rate if str(getattr(path[-1], 'key', '')).startswith('mean') \
          else 0.05 * cfg.optim.learning_rate
      np.testing.assert_allclose(x, y, rtol=1e-3, atol=atol, err_msg=jax.tree_util.keystr(path))
  # ... and the members differ from each other.
  assert not np.allclose(jax.tree.leaves(steps.member(ensemble, 0).params)[0],
                         jax.tree.leaves(steps.member(ensemble, 1).params)[0])


def test_stacked_checkpoint_round_trips(tmp_path):
  cfg = tiny_config()
  cfg.num_seeds = 2
  state = _train(cfg, 1)
  manager = checkpointing.create_manager(str(tmp_path))
  checkpointing.save(manager, state)
  manager.wait_until_finished()
  template = steps.create_train_state(models.create_model(cfg.model),
                                      train.create_optimizer(cfg, 1), steps.member_keys(9, 2),
                                      tuple(cfg.data.image_size))
  restored = checkpointing.restore(manager, template)
  manager.close()
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(x, y)
  assert jax.tree.leaves(restored.params)[0].shape[0] == 2


def test_aggregate_statistics_hand_computed():
  members = [{'dice': 0.8, 'auc': 0.6, 'confusion': [[3, 1], [0, 2]]},
             {'dice': 0.9, 'auc': 0.7, 'confusion': [[2, 2], [1, 1]]},
             {'dice': 1.0, 'auc': 0.8, 'confusion': [[4, 0], [1, 1]]}]
  agg = evaluate.aggregate_members(members)
  assert agg['dice'] == pytest.approx(0.9)
  assert agg['std']['dice'] == pytest.approx(0.1)                      # sample std, ddof 1
  half = 4.302652729911275 * 0.1 / np.sqrt(3)                          # t(0.975, 2)
  assert agg['ci95_across_members']['dice'] == pytest.approx([0.9 - half, 0.9 + half])
  assert agg['confusion'] == [[3.0, 1.0], [2 / 3, 4 / 3]]
  assert agg['iou'] is None                                            # absent everywhere


def test_ensemble_entry_uses_averaged_probabilities():
  cfg = tiny_config()
  cfg.num_seeds = 3
  state = _train(cfg, 2)
  model = models.create_model(cfg.model)
  split = input_pipeline.get_split(cfg.data, 'test')
  eval_step = jax.jit(lambda st, b: steps.eval_step(st, b, model=model, threshold=0.5))
  r = evaluate.evaluate_split(eval_step, state, split, batch_size=5, threshold=0.5,
                              bootstrap_samples=10)
  images = np.stack([split.source[i]['image'] for i in range(len(split.source))])
  masks = np.stack([split.source[i]['mask'] for i in range(len(split.source))])
  probs = jax.device_get(steps.member_predictions(state, images, model=model))
  mean_lesion, mean_mel = probs['lesion_prob'].mean(0), probs['melanoma_prob'].mean(0)
  expected_seg = metrics.segmentation_scores(metrics.segmentation_counts(mean_lesion >= 0.5, masks))
  assert r['ensemble']['dice'] == pytest.approx(expected_seg['dice'], abs=1e-9)
  assert r['ensemble']['auc'] == pytest.approx(metrics.roc_auc(split.labels, mean_mel))
  # Not the average of the members' metrics (which is the top-level entry).
  assert r['dice'] == pytest.approx(np.mean([m['dice'] for m in r['members']]))
  assert len(r['members']) == 3


def test_main_with_num_seeds_writes_member_aggregate_and_ensemble_entries(tmp_path):
  r = subprocess.run([sys.executable, '-m', 'skinmtl_jax.main', '--config=configs/tiny.py',
                      f'--workdir={tmp_path}', '--config.num_seeds=2'], cwd=ROOT,
                     env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  m = json.loads((tmp_path / 'metrics.json').read_text())
  t = m['test']
  assert m['num_seeds'] == 2 and len(t['members']) == 2
  assert {'std', 'ci95_across_members', 'ensemble'} <= set(t)
  assert 'mean ± std of 2 seeds' in (tmp_path / 'report.md').read_text()
