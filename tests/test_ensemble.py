"""Seed ensembles: K members in one vmapped step, each the same model as a single run."""

import csv
import json

import jax
import numpy as np
import pytest

from conftest import bias_before_batchnorm, tiny_config
from helpers import run_main
from skinmtl_jax import checkpointing, evaluate, input_pipeline, metrics, models, saved_run
from skinmtl_jax import steps, train


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
  tx = steps.create_optimizer(cfg.optim, num_steps)
  state = steps.create_train_state(model, tx, steps.member_keys(cfg.seed, k),
                                   tuple(cfg.data.image_size))
  step = steps.make_train_step(model, tx, shared_batch=shared)
  for _ in range(num_steps):
    batches = [next(it) for it in iters]
    batch = batches[0] if shared else {key: np.stack([b[key] for b in batches])
                                       for key in batches[0]}
    state, _ = step(state, batch)
  return state


def _run(tmp_path_factory, name, **fields):
  """train_and_evaluate of tiny mtl2 (4 steps) with `fields` set; the final stacked state."""
  cfg = tiny_config('mtl2')
  cfg.num_train_steps, cfg.checkpoint_every_steps = 4, 4
  cfg.update(fields)
  workdir = str(tmp_path_factory.mktemp(name))
  train.train_and_evaluate(cfg, workdir)
  return jax.device_get(saved_run.load_run(workdir)[2]), cfg.optim.learning_rate


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Two-member ensembles (seed 5) with shared and per-member data orders, and the single
  runs each member must equal: member i has seed 5 + i and reads data order 5 (shared) or
  5 + i (per member)."""
  run = lambda name, **kw: _run(tmp_path_factory, name, **kw)[0]
  return {'shared': run('shared', seed=5, num_seeds=2, seed_data_order='shared'),
          'per_member': run('per_member', seed=5, num_seeds=2, seed_data_order='per_member'),
          'per_member_vmap': run('per_member_vmap', seed=5, num_seeds=2,
                                 seed_data_order='per_member', member_loop='vmap'),
          'shared_vmap': run('shared_vmap', seed=5, num_seeds=2, seed_data_order='shared',
                             member_loop='vmap'),
          (5, 5): run('s5d5', seed=5), (6, 5): run('s6d5', seed=6, data_seed=5),
          (6, 6): run('s6d6', seed=6)}


def _assert_member_equals(ensemble, i, single, lr):
  a, b = steps.member(ensemble, i), steps.member(single, 0)
  for (path, x), y in zip(
      jax.tree_util.tree_leaves_with_path((a.params, a.batch_stats, a.opt_state)),
      jax.tree.leaves((b.params, b.batch_stats, b.opt_state))):
    name = jax.tree_util.keystr(path)
    if bias_before_batchnorm(path):
      # Its true gradient is exactly zero (BatchNorm removes any shift): pure round-off,
      # which Adam rescales to lr-sized steps, so it (and its Adam moments) cannot agree.
      continue
    x, y = np.asarray(x), np.asarray(y)
    if name.startswith('[1]') and 'mean' in name:
      atol = 10 * lr   # running means carry those biases
    elif name.startswith('[2]'):
      # Adam moments: round-off only. The bias noise above reaches them too: with the CPU
      # kernel gradient (skinmtl_jax/models/conv.py) the unrolled member 1 and its single run
      # (bitwise equal for 3 steps, then compiled into different programs) differ by up to
      # 0.5 % of a leaf's largest moment after 4 steps, and their parameters as much as the
      # same single run's with XLA's gradient and with the kernel. A wrong data order moves
      # the parameters themselves by tens of percent (the classifier's biases), caught below.
      atol = 1e-2 * float(np.max(np.abs(y))) + 1e-12
    else:
      # Adam divides by the gradient's own scale, so where a gradient is tiny the round-off
      # of a differently ordered (vmapped) computation moves a parameter by up to a few
      # percent of one step (lr). A wrong key or data order differs by ~0.1.
      atol = 0.05 * lr
    np.testing.assert_allclose(x, y, rtol=1e-3, atol=atol, err_msg=name)


@pytest.mark.parametrize('order', ['per_member', 'shared', 'per_member_vmap'])
def test_member_i_equals_a_single_run_with_its_seed(runs, order):
  """Through train_and_evaluate: every member's parameters, BatchNorm statistics and Adam
  state are those of the single run with its seed and data order; with the members unrolled
  in the step (the CPU's default) and vmapped (the accelerators')."""
  lr = tiny_config('mtl2').optim.learning_rate
  _assert_member_equals(runs[order], 0, runs[(5, 5)], lr)
  _assert_member_equals(runs[order], 1, runs[(6, 5) if order == 'shared' else (6, 6)], lr)
  # ... and the members differ from each other; so do the two data orders of seed 6, so
  # matching (6, 6) means the per-member member 1 read its own order, data_seed + 1.
  assert not np.allclose(jax.tree.leaves(steps.member(runs[order], 0).params)[0],
                         jax.tree.leaves(steps.member(runs[order], 1).params)[0])
  assert not np.allclose(jax.tree.leaves(runs[(6, 5)].params)[0],
                         jax.tree.leaves(runs[(6, 6)].params)[0])


def test_vmapped_members_with_the_shared_order_equal_single_runs(runs):
  """What the GPU check trains (benchmarks/device_check.sh): the members vmapped in the step
  (the accelerators' member loop) and one data order shared by all. Member i is the single run
  with seed 5 + i on data order 5, member by member, and the members differ."""
  lr = tiny_config('mtl2').optim.learning_rate
  _assert_member_equals(runs['shared_vmap'], 0, runs[(5, 5)], lr)
  _assert_member_equals(runs['shared_vmap'], 1, runs[(6, 5)], lr)
  assert not np.allclose(jax.tree.leaves(steps.member(runs['shared_vmap'], 0).params)[0],
                         jax.tree.leaves(steps.member(runs['shared_vmap'], 1).params)[0])


def test_stacked_checkpoint_round_trips(tmp_path):
  cfg = tiny_config()
  cfg.num_seeds = 2
  state = _train(cfg, 1)
  manager = checkpointing.create_manager(str(tmp_path))
  checkpointing.save(manager, state)
  manager.wait_until_finished()
  template = steps.create_train_state(models.create_model(cfg.model),
                                      steps.create_optimizer(cfg.optim, 1), steps.member_keys(9, 2),
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
  assert agg['ci95_across_members']['dice'] == pytest.approx([0.9 - half, 1.0])   # clipped
  assert agg['ci95_across_members']['auc'] == pytest.approx([0.7 - half, 0.7 + half])
  low = evaluate.aggregate_members([{'tnr': 0.0}, {'tnr': 0.1}, {'tnr': 0.5}])
  assert low['ci95_across_members']['tnr'][0] == 0.0
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
  expected_seg = metrics.segmentation_scores(
      np.asarray(steps.seg_counts(mean_lesion, masks, 0.5)))
  assert r['ensemble']['dice'] == pytest.approx(expected_seg['dice'], abs=1e-9)
  assert r['ensemble']['auc'] == pytest.approx(metrics.roc_auc(split.labels, mean_mel))
  # Not the average of the members' metrics (which is the top-level entry).
  assert r['dice'] == pytest.approx(np.mean([m['dice'] for m in r['members']]))
  assert len(r['members']) == 3


def test_main_with_num_seeds_writes_member_aggregate_and_ensemble_entries(tmp_path):
  r = run_main(tmp_path, '--config.num_seeds=2', timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  m = json.loads((tmp_path / 'metrics.json').read_text())
  t = m['test']
  assert m['num_seeds'] == 2 and len(t['members']) == 2
  assert {'std', 'ci95_across_members', 'ensemble'} <= set(t)
  assert 'mean ± std of 2 seeds' in (tmp_path / 'report.md').read_text()
  # Calibration: each member's ECE and Brier (mean ± std); the ensemble's probability (what
  # predict gives) calibrated on the validation split.
  assert {'ece', 'brier'} <= set(t['std']) and 0 <= t['ensemble']['ece'] <= 1
  assert {'ece', 'brier', 'tnr'} <= set(t['ensemble']['calibrated'])
  assert m['calibration']['n'] == 3 and 'calibrated' not in t
  assert "Calibration of tiny ensemble's melanoma probability" in (
      tmp_path / 'report.md').read_text()
  # per_image_test.csv has each member's probabilities beside the ensemble's: they give the
  # members' own AUC (what a paired comparison of seeds across runs needs).
  with open(tmp_path / 'per_image_test.csv', encoding='utf-8') as f:
    rows = list(csv.DictReader(f))
  labels = np.array([int(r['label']) for r in rows])
  for i in range(2):
    p = np.array([float(r[f'melanoma_prob_member{i}']) for r in rows])
    assert metrics.roc_auc(labels, p) == pytest.approx(t['members'][i]['auc'])
  ens = np.array([float(r['melanoma_prob']) for r in rows])
  assert metrics.roc_auc(labels, ens) == pytest.approx(t['ensemble']['auc'])
  # ... and each member's Dice: the per-seed DSC re-derives from the CSV.
  for i in range(2):
    d = np.array([float(r[f'dice_member{i}']) for r in rows])
    assert d.mean() == pytest.approx(t['members'][i]['dice'])
  # The validation split's per-image outputs (what a threshold chosen on it is chosen from).
  with open(tmp_path / 'per_image_validation.csv', encoding='utf-8') as f:
    val = list(csv.DictReader(f))
  assert len(val) == m['validation_examples'] == 3 and 'melanoma_prob_member1' in val[0]


def test_validation_curve_every_epoch(tmp_path):
  r = run_main(tmp_path, '--config.num_seeds=2', '--config.num_train_steps=-1',
               '--config.num_epochs=3', '--config.eval_every_epochs=1', timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(tmp_path / 'scalars.jsonl', encoding='utf-8') as f:
    rows = [json.loads(l) for l in f]
  curve = [row for row in rows if 'validation/dice' in row]
  # tiny: 21 training images enlarged to 24 per epoch, batch 4: 6 steps per epoch.
  assert [row['step'] for row in curve] == [6, 12, 18]
  assert all({'validation/auc', 'validation/ensemble_dice'} <= set(row) for row in curve)
  # The last point is the final model's: the measures the calibration was fitted beside.
  m = json.loads((tmp_path / 'metrics.json').read_text())
  with open(tmp_path / 'per_image_validation.csv', encoding='utf-8') as f:
    val = list(csv.DictReader(f))
  dice = np.mean([[float(v[f'dice_member{i}']) for v in val] for i in range(2)])
  assert curve[-1]['validation/dice'] == pytest.approx(dice)
  assert m['steps'] == 18
