"""The paper's training loss (Eq. 3): lambda_1 * soft Dice + lambda_2 * cross-entropy."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Array = Any

TASKS = ('seg', 'cls')
TASK_TERMS = {'seg': 'dice_loss', 'cls': 'cls_loss'}  # each task's term in `loss_terms`


def soft_dice_loss(seg_logits: Array, masks: Array, smooth: float = 1.0) -> Array:
  """1 - soft Dice of the lesion probability, computed per image and averaged.

  Args:
    seg_logits: (batch, H, W, 2) logits; channel 1 is the lesion.
    masks: (batch, H, W) in {0, 1}.
    smooth: added to numerator and denominator, so an empty mask and an empty prediction score 1.
  Returns:
    Scalar loss.
  """
  p = jax.nn.softmax(seg_logits.astype(jnp.float32), axis=-1)[..., 1]
  m = masks.astype(jnp.float32)
  inter = jnp.sum(p * m, axis=(1, 2))
  denom = jnp.sum(p, axis=(1, 2)) + jnp.sum(m, axis=(1, 2))
  return 1.0 - jnp.mean((2.0 * inter + smooth) / (denom + smooth))


def classification_loss(cls_logits: Array, labels: Array) -> Array:
  """Mean 2-class softmax cross-entropy (the same as binary cross-entropy on the melanoma logit gap)."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      cls_logits.astype(jnp.float32), labels.astype(jnp.int32)))


def loss_terms(outputs: dict[str, Array], batch: dict[str, Array], *,
               dice_smooth: float = 1.0) -> dict[str, Array]:
  """The unweighted loss of each task the model has (a single-task model has one term):
  'dice_loss' (of 'seg_logits' against batch['mask']), 'cls_loss' ('cls_logits', 'label')."""
  terms = {}
  if 'seg_logits' in outputs:
    terms['dice_loss'] = soft_dice_loss(outputs['seg_logits'], batch['mask'], dice_smooth)
  if 'cls_logits' in outputs:
    terms['cls_loss'] = classification_loss(outputs['cls_logits'], batch['label'])
  return terms


def weighted_loss(terms: dict[str, Array], weights: dict[str, float]) -> Array:
  """The training loss (Eq. 3) from the unweighted terms: the sum of weights[task] * term."""
  return sum(weights[t] * terms[TASK_TERMS[t]] for t in TASKS if TASK_TERMS[t] in terms)


class LossConfig(NamedTuple):
  """config.loss, read once: the weights of Eq. 3, the Dice smoothing, and how the two task
  gradients combine ('weighted': the gradient of Eq. 3; 'pcgrad', see gradients.pcgrad)."""
  dice_weight: float = 0.5
  cls_weight: float = 0.5
  dice_smooth: float = 1.0
  balancing: str = 'weighted'

  @classmethod
  def from_config(cls, loss_cfg) -> 'LossConfig':
    # .get: a run saved before a field existed (its config.json) reads the default.
    return cls(**{k: type(v)(loss_cfg.get(k, v)) for k, v in cls._field_defaults.items()})

  @property
  def weights(self) -> dict[str, float]:
    """{task: weight}, as `weighted_loss` and `gradients.task_gradients` take them."""
    return {'seg': self.dice_weight, 'cls': self.cls_weight}
