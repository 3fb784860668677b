"""The predictor behind `python -m skinmtl_jax.predict`: test-time augmentation and ensembles,
on a tiny model (no trained run or real data needed)."""

import jax
import numpy as np
import pytest

from conftest import tiny_config
from skinmtl_jax import models, predict, steps


@pytest.fixture(scope='module')
def model_and_state():
  """A tiny mtl3 of two members, its BatchNorm statistics moved off their initial values so
  that eval mode is not the identity."""
  cfg = tiny_config('mtl3')
  model = models.create_model(cfg.model)
  state = steps.create_train_state(model, steps.create_optimizer(cfg.optim, 1),
                                   steps.member_keys(0, 2), (32, 32))
  stats = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(3), x.shape),
                       state.batch_stats)
  return model, state.replace(batch_stats=stats)


def _images(h, w, n=2, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_tta_is_equivariant_to_flips_and_turns_of_the_input(model_and_state):
  """The 8 dihedral transforms form a group, so with correct inverses the averaged prediction
  of a turned or flipped image is the turned or flipped prediction. A wrong inverse breaks it."""
  model, state = model_and_state
  tta = predict.make_predictor(model, state, tta=True)
  x = _images(32, 48)                                         # non-square
  base = tta(x)
  for move in (lambda a: a[:, :, ::-1], lambda a: a[:, ::-1], lambda a: a[:, ::-1, ::-1]):
    got = tta(np.ascontiguousarray(move(x)))
    np.testing.assert_allclose(got['lesion_prob'], move(base['lesion_prob']), atol=2e-5)
    np.testing.assert_allclose(got['melanoma_prob'], base['melanoma_prob'], atol=2e-5)
  square = _images(32, 32, seed=1)
  base = tta(square)
  got = tta(np.ascontiguousarray(np.rot90(square, 1, axes=(1, 2))))
  np.testing.assert_allclose(got['lesion_prob'], np.rot90(base['lesion_prob'], 1, axes=(1, 2)),
                             atol=2e-5)
  # ... which a single pass is not: TTA really averages.
  plain = predict.make_predictor(model, state, tta=False)
  assert not np.allclose(plain(square)['lesion_prob'], base['lesion_prob'], atol=1e-4)


def test_the_predictor_averages_the_members(model_and_state):
  model, state = model_and_state
  x = _images(32, 48)
  both = predict.make_predictor(model, state, tta=False)(x)
  each = [predict.make_predictor(model, jax.tree.map(lambda a: a[i:i + 1], state),
                                 tta=False)(x) for i in range(2)]
  for key in ('lesion_prob', 'melanoma_prob'):
    np.testing.assert_allclose(both[key], (each[0][key] + each[1][key]) / 2, atol=1e-6)
    assert not np.allclose(each[0][key], each[1][key])   # the members do differ


def test_the_opinions_are_the_members_or_one_members_views(model_and_state):
  """With several members, the opinions are the members (each averaged over its views with
  TTA); with one, its views. Their mean is the prediction either way."""
  model, state = model_and_state
  x = _images(32, 48, n=1)
  both = predict.make_predictor(model, state, tta=True)(x)
  assert both['opinions_are'] == 'members' and both['members'] == 2 and both['views'] == 8
  for i in range(2):
    alone = predict.make_predictor(model, jax.tree.map(lambda a: a[i:i + 1], state), tta=True)(x)
    assert alone['opinions_are'] == 'views' and alone['opinions']['melanoma_prob'].shape == (8, 1)
    for key in ('lesion_prob', 'melanoma_prob'):
      np.testing.assert_allclose(both['opinions'][key][i], alone[key], atol=1e-6)
      np.testing.assert_allclose(alone['opinions'][key].mean(0), alone[key], atol=1e-6)
  # A view's lesion map is turned back: each view's map is the un-augmented pass's, turned.
  plain = predict.make_predictor(model, jax.tree.map(lambda a: a[:1], state), tta=False)
  turned = np.ascontiguousarray(np.rot90(x, 1, axes=(1, 2)))
  view = predict.make_predictor(model, jax.tree.map(lambda a: a[:1], state), tta=True)(x)
  np.testing.assert_allclose(view['opinions']['lesion_prob'][1],
                             np.rot90(plain(turned)['lesion_prob'], -1, axes=(1, 2)), atol=2e-5)
  one = plain(x)
  assert one['opinions']['melanoma_prob'].shape == (1, 1) and one['views'] == 1
