"""The gradient study (#6): task gradients, path separation, statistics, PCGrad, the CLI."""

import csv
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from helpers import run_module
from skinmtl_jax import losses as skinmtl_losses
from skinmtl_jax import gradients, grad_study, models, steps, train


def _batch(size=(32, 32), n=4, seed=0):
  rng = np.random.default_rng(seed)
  return {'image': rng.integers(0, 256, (n, *size, 3), dtype=np.uint8),
          'mask': (rng.random((n, *size)) > 0.5).astype(np.uint8),
          'label': np.array([0, 1] * (n // 2), np.int32)}


@functools.lru_cache
def _model_and_variables(name, **overrides):
  cfg = tiny_config(name)
  for k, v in overrides.items():
    cfg.model[k] = v
  model = models.create_model(cfg.model)
  variables = steps.init_variables(model, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  return model, variables


def test_task_gradients_add_up_to_the_training_gradient_leaf_by_leaf():
  model, variables = _model_and_variables('mtl2')
  batch = _batch()
  terms_fn = functools.partial(steps.forward_loss_terms, batch_stats=variables['batch_stats'],
                               batch=batch, model=model)
  weights = {'seg': 0.3, 'cls': 0.7}
  by_task, _, _ = jax.jit(lambda p: gradients.task_gradients(terms_fn, p, weights))(
      variables['params'])

  def loss(p):
    terms, _ = terms_fn(p)
    return 0.3 * terms['dice_loss'] + 0.7 * terms['cls_loss']

  total = jax.jit(jax.grad(loss))(variables['params'])
  flat_total = jax.tree_util.tree_flatten_with_path(total)[0]
  # float32 round-off: relative to each entry, and absolute relative to the largest gradient
  # (conv biases that feed BatchNorm have a true gradient of zero, computed as ~1e-8 noise).
  scale = max(float(np.abs(t).max()) for t in jax.tree.leaves(total))
  for (path, t), s, c in zip(flat_total, jax.tree.leaves(by_task['seg']),
                             jax.tree.leaves(by_task['cls'])):
    np.testing.assert_allclose(s + c, t, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=gradients.path_name(path))
  # Both tasks really reach the shared encoder (not a vacuous sum of zeros).
  enc = lambda g: optax_norm(g['encoder'])
  assert enc(by_task['seg']) > 0 and enc(by_task['cls']) > 0


def optax_norm(tree):
  return float(jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree))))


@functools.lru_cache
def _study(stop_gradient: bool, mode: str = 'params'):
  model, variables = _model_and_variables('mtl2', reverse_stop_gradient=stop_gradient,
                                          reverse_mode=mode)
  fn = jax.jit(functools.partial(steps.study, model=model))  # weights 0.5, 0.5
  return jax.device_get(fn(variables['params'], variables['batch_stats'], _batch()))


@pytest.mark.parametrize('layer', ['classifier/fc_k0', 'classifier/fc_k1'])
def test_the_reverse_path_gives_exactly_zero_at_the_classifier_when_stopped(layer):
  stopped, live = _study(True)[layer], _study(False)[layer]
  assert stopped['reverse_norm'] == 0.0
  assert live['reverse_norm'] > 0.0
  # In 'params' mode the segmentation loss reaches FC_cls^k only through the reverse path and
  # the classification loss only through the head: the two separations agree.
  np.testing.assert_allclose(live['reverse_norm'], live['seg_norm'], rtol=1e-5)
  np.testing.assert_allclose(live['head_norm'], live['cls_norm'], rtol=1e-5)
  assert stopped['seg_norm'] == 0.0 and stopped['head_norm'] > 0.0


def test_study_reports_every_stage_and_the_gated_decoder_inputs():
  result = _study(False)
  for group in ('encoder/stage1', 'encoder/stage4', 'decoder1', 'decoder3', 'seg_head',
                'encoder', 'decoder', 'classifier', 'all'):
    assert set(result[group]) >= {'seg_norm', 'cls_norm', 'ratio', 'cosine', 'conflict'}, group
    assert result[group]['seg_norm'] > 0, group
  # The last two decoder levels are gated in mtl2: gradient at their scaled inputs, gate range.
  for level in ('gated/decoder1', 'gated/decoder2'):
    g = result[level]
    assert g['seg_norm'] > 0 and g['cls_norm'] == 0.0  # pass 2 feeds only the segmentation
    assert 0.0 < g['gate_min'] <= g['gate_mean'] <= g['gate_max'] < 1.0
  assert 'gated/decoder3' not in result
  # The encoder aggregate is the root sum of squares of its stages.
  stages = [result[f'encoder/stage{i}']['seg_norm'] for i in range(1, 5)]
  np.testing.assert_allclose(result['encoder']['seg_norm'], np.sqrt(np.sum(np.square(stages))),
                             rtol=1e-5)


def test_activations_mode_sends_the_reverse_gradient_through_the_whole_classifier():
  live = _study(False, 'activations')
  # The image-dependent gate depends on the projections too: the reverse path reaches them.
  assert live['classifier/proj0']['reverse_norm'] > 0.0
  assert live['classifier/fc_k0']['reverse_norm'] > 0.0


def test_identical_gradients_give_cosine_one_and_no_conflicts():
  g = {'a': jnp.array([1.0, -2.0, 3.0]), 'b': {'c': jnp.array([[0.5, -0.1]])}}
  s = gradients.pair_statistics(g, g, group=lambda n: 'g')['g']
  np.testing.assert_allclose(s['cosine'], 1.0, rtol=1e-6)
  assert s['conflict'] == 0.0
  np.testing.assert_allclose(s['a_norm'], np.sqrt(1 + 4 + 9 + 0.25 + 0.01), rtol=1e-6)
  neg = jax.tree.map(lambda x: -x, g)
  s = gradients.pair_statistics(g, neg, group=lambda n: 'g')['g']
  np.testing.assert_allclose(s['cosine'], -1.0, rtol=1e-6)
  assert s['conflict'] == 1.0


def test_pair_statistics_on_a_hand_computed_case():
  a = {'x': jnp.array([1.0, -1.0, 0.0, 2.0])}
  b = {'x': jnp.array([1.0, 1.0, 3.0, -1.0])}
  s = gradients.pair_statistics(a, b, group=lambda n: 'g')['g']
  np.testing.assert_allclose(s['cosine'], -2.0 / (np.sqrt(6) * np.sqrt(12)), rtol=1e-6)
  assert s['conflict'] == 0.5  # entries 2 and 4; the zero in entry 3 is not a conflict
  zero = gradients.pair_statistics(a, {'x': jnp.zeros(4)}, group=lambda n: 'g')['g']
  assert np.isnan(zero['cosine']) and zero['conflict'] == 0.0


def test_pcgrad_gives_the_textbook_projection():
  g1, g2 = {'w': jnp.array([1.0, 0.0])}, {'w': jnp.array([-1.0, 1.0])}
  # g1' = g1 - (g1.g2/|g2|^2) g2 = (0.5, 0.5); g2' = g2 - (g2.g1/|g1|^2) g1 = (0, 1).
  np.testing.assert_allclose(gradients.pcgrad(g1, g2)['w'], [0.5, 1.5], rtol=1e-6)
  # Gradients that agree are simply added.
  g3 = {'w': jnp.array([1.0, 1.0])}
  np.testing.assert_allclose(gradients.pcgrad(g1, g3)['w'], [2.0, 1.0])


def test_pcgrad_training_lowers_the_loss():
  cfg = tiny_config('mtl2')
  cfg.optim.learning_rate = cfg.optim.final_learning_rate = 3e-3
  model = models.create_model(cfg.model)
  tx = steps.create_optimizer(cfg.optim, 12)
  state = steps.create_train_state(model, tx, steps.member_keys(0, 1), (32, 32))
  step = steps.make_train_step(model, tx, shared_batch=True,
                               loss=skinmtl_losses.LossConfig(balancing='pcgrad'))
  batch, losses = _batch(n=8), []
  for _ in range(12):
    state, m = step(state, batch)
    losses.append(float(m['loss'][0]))
    assert -1.0 <= float(m['task_cosine'][0]) <= 1.0
  assert losses[-1] < 0.85 * losses[0], losses


def test_the_pcgrad_step_applies_the_projected_task_gradients():
  """The train step's gradient under balancing='pcgrad' is PCGrad of the two weighted task
  gradients: its norm is that of `gradients.pcgrad`, not of their plain sum."""
  cfg = tiny_config('mtl2')
  model = models.create_model(cfg.model)
  tx = steps.create_optimizer(cfg.optim, 12)
  state = steps.create_train_state(model, tx, steps.member_keys(0, 1), (32, 32))
  batch = _batch(n=8)
  member = steps.member(state, 0)
  terms_fn = functools.partial(steps.forward_loss_terms, batch_stats=member.batch_stats,
                               batch=jax.tree.map(jnp.asarray, batch), model=model)
  by_task, _, _ = gradients.task_gradients(terms_fn, member.params, {'seg': 0.5, 'cls': 0.5})
  projected = float(optax.tree.norm(gradients.pcgrad(by_task['seg'], by_task['cls'])))
  summed = float(optax.tree.norm(jax.tree.map(jnp.add, by_task['seg'], by_task['cls'])))
  step = steps.make_train_step(model, tx, shared_batch=True,
                               loss=skinmtl_losses.LossConfig(balancing='pcgrad'))
  _, m = step(state, batch)
  assert float(m['l2_grads'][0]) == pytest.approx(projected, rel=1e-4)
  assert abs(projected - summed) > 1e-3 * summed, (projected, summed)  # they do conflict


def test_training_logs_the_study_and_the_cli_plots_it_over_checkpoints(tmp_path):
  cfg = tiny_config('mtl2')
  cfg.grad_study_every_steps = 2
  cfg.num_train_steps = 6
  cfg.checkpoint_every_steps = 2
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(cfg, workdir)
  table = grad_study.read_csv(os.path.join(workdir, 'grad_study.csv'))
  assert sorted({r['step'] for r in table}) == [0, 2, 4]
  groups = {r['group'] for r in table}
  assert {'encoder/stage1', 'classifier/fc_k0', 'gated/decoder1', 'all'} <= groups
  # Its scalars reach TensorBoard on a default install (no TensorFlow), beside the run's.
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(workdir)
  acc.Reload()
  assert [e.step for e in acc.Scalars('grad_study/all/cosine')] == [0, 2, 4]
  assert 'train/loss' in acc.Tags()['scalars']

  # A resumed run first drops the rows written after its checkpoint.
  grad_study.CsvLog(os.path.join(workdir, 'grad_study.csv'), resume_step=2)
  assert sorted({r['step'] for r in grad_study.read_csv(
      os.path.join(workdir, 'grad_study.csv'))}) == [0]

  # The command over every checkpoint: its CSV, both figures and the summary.
  out = tmp_path / 'study'
  r = run_module('skinmtl_jax.grad_study', f'--workdir={workdir}', f'--out={out}',
                 '--num_images=4', timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  table = grad_study.read_csv(str(out / 'grad_study_checkpoints.csv'))
  assert sorted({r['step'] for r in table}) == [2, 4, 6]
  with open(out / 'grad_study_checkpoints.csv', newline='', encoding='utf-8') as f:
    assert next(csv.reader(f)) == list(grad_study.CSV_COLUMNS)
  for png in ('grad_study_checkpoints.png', 'grad_study_training.png'):
    assert (out / png).stat().st_size > 10_000, png
  summary = (out / 'summary.md').read_text()
  assert 'encoder/stage1' in summary and 'cosine' in summary
