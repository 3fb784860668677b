import jax.numpy as jnp
import numpy as np
import pytest

from skinmtl_jax import config_base, losses


def _logits(prob):
  p = jnp.asarray(prob, jnp.float32)
  return jnp.stack([jnp.zeros_like(p), jnp.log(p) - jnp.log1p(-p)], axis=-1)


def test_soft_dice_hand_computed():
  prob = np.array([[[0.9, 0.2], [0.5, 0.1]]])
  mask = np.array([[[1, 0], [1, 0]]])
  inter, denom = 0.9 + 0.5, (0.9 + 0.2 + 0.5 + 0.1) + 2
  expected = 1 - (2 * inter + 1) / (denom + 1)
  assert float(losses.soft_dice_loss(_logits(prob), mask)) == pytest.approx(expected, rel=1e-5)


def test_soft_dice_is_the_mean_of_per_image_dice_not_pooled():
  """Two images of very different lesion sizes: the paper's loss averages their Dice; Dice over
  the pooled pixels would weight the large lesion far more."""
  prob = np.array([[[0.9, 0.9], [0.9, 0.9]],     # a large lesion, well found
                   [[0.1, 0.1], [0.1, 0.6]]])    # a one-pixel lesion, half found
  mask = np.array([[[1, 1], [1, 1]], [[0, 0], [0, 1]]])
  per_image = [(2 * 3.6 + 1) / (3.6 + 4 + 1), (2 * 0.6 + 1) / (0.9 + 1 + 1)]
  expected = 1 - np.mean(per_image)
  pooled = 1 - (2 * 4.2 + 1) / (4.5 + 5 + 1)
  got = float(losses.soft_dice_loss(_logits(prob), mask))
  assert got == pytest.approx(expected, rel=1e-5)
  assert abs(got - pooled) > 0.03   # 0.144 against 0.105


def test_loss_terms_and_their_weighting():
  seg = _logits(np.full((2, 2, 2), 0.5))
  cls = jnp.array([[0.0, 0.0], [0.0, 0.0]])
  batch = {'mask': np.zeros((2, 2, 2)), 'label': np.array([0, 1])}
  weights = losses.LossConfig(dice_weight=0.3, cls_weight=0.7).weights
  terms = losses.loss_terms({'seg_logits': seg, 'cls_logits': cls}, batch)
  assert float(terms['cls_loss']) == pytest.approx(np.log(2), rel=1e-6)
  assert float(losses.weighted_loss(terms, weights)) == pytest.approx(
      0.3 * float(terms['dice_loss']) + 0.7 * np.log(2), rel=1e-6)
  # A segmentation-only model has only the Dice term.
  terms = losses.loss_terms({'seg_logits': seg}, batch)
  assert set(terms) == {'dice_loss'}
  assert float(losses.weighted_loss(terms, weights)) == pytest.approx(0.3 * float(terms['dice_loss']))


def test_loss_config_reads_config_loss():
  c = config_base.get_config().loss
  c.dice_weight, c.balancing = 0.25, 'pcgrad'
  assert losses.LossConfig.from_config(c) == losses.LossConfig(0.25, 0.5, 1.0, 'pcgrad')
  del c['balancing']   # the config.json of a run from before the field: its default
  assert losses.LossConfig.from_config(c).balancing == 'weighted'
