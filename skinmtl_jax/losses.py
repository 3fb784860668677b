"""The paper's training loss (Eq. 3): lambda_1 * soft Dice + lambda_2 * cross-entropy."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

Array = Any


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


def total_loss(outputs: dict[str, Array], batch: dict[str, Array], *, dice_weight: float,
               cls_weight: float, dice_smooth: float = 1.0) -> tuple[Array, dict[str, Array]]:
  """Weighted sum of the losses of the tasks the model has (a single-task model has one term).

  Returns:
    (loss, terms) where terms holds each unweighted loss by name.
  """
  terms, loss = {}, jnp.zeros((), jnp.float32)
  if 'seg_logits' in outputs:
    terms['dice_loss'] = soft_dice_loss(outputs['seg_logits'], batch['mask'], dice_smooth)
    loss = loss + dice_weight * terms['dice_loss']
  if 'cls_logits' in outputs:
    terms['cls_loss'] = classification_loss(outputs['cls_logits'], batch['label'])
    loss = loss + cls_weight * terms['cls_loss']
  return loss, terms
