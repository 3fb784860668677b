"""Per-task gradients, PCGrad, and statistics comparing two gradients over parameter groups.

The training loss (paper Eq. 3) is `dice_weight * Dice + cls_weight * CE`; its gradient is the
sum of the two *task gradients* `dice_weight * grad(Dice)` and `cls_weight * grad(CE)`.
`task_gradients` computes both from one forward pass (one `jax.vjp`, two backward passes).
`pcgrad` combines them the way Yu et al. (2020, "Gradient surgery for multi-task learning")
do: where the two conflict (negative inner product), each is projected onto the normal plane
of the other before they are added.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from skinmtl_jax.losses import TASK_TERMS, TASKS

Array = Any



def task_gradients(loss_terms_fn: Callable[[Any], tuple[dict[str, Array], Any]], params: Any,
                   weights: dict[str, float]) -> tuple[dict[str, Any], dict[str, Array], Any]:
  """Gradients of each weighted task loss with respect to `params`, from one forward pass.

  Args:
    loss_terms_fn: params -> (terms, aux), terms holding the unweighted task losses by name
      ('dice_loss', 'cls_loss').
    params: the pytree to differentiate.
    weights: {'seg': dice_weight, 'cls': cls_weight}.
  Returns:
    (grads, terms, aux): grads[task] for each task whose term `loss_terms_fn` returns, each
    the gradient of weights[task] * term, so they add up to the gradient of the training loss.
  """

  def weighted(p):
    terms, aux = loss_terms_fn(p)
    losses = {t: weights[t] * terms[TASK_TERMS[t]] for t in TASKS if TASK_TERMS[t] in terms}
    return losses, (terms, aux)

  losses, vjp_fn, (terms, aux) = jax.vjp(weighted, params, has_aux=True)
  grads = {}
  for t in losses:
    cotangent = {u: jnp.ones_like(v) if u == t else jnp.zeros_like(v) for u, v in losses.items()}
    grads[t] = vjp_fn(cotangent)[0]
  return grads, terms, aux


def tree_vdot(a: Any, b: Any) -> Array:
  return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def pcgrad(g1: Any, g2: Any, eps: float = 1e-20) -> Any:
  """PCGrad for two tasks: the sum of the two gradients after projecting each, where they
  conflict, onto the normal plane of the other (both projections use the original gradients).

  Over all parameters, flattened into one vector, as in the original implementation.
  """
  dot = tree_vdot(g1, g2)
  conflict = jnp.minimum(dot, 0.0)
  c1 = conflict / jnp.maximum(tree_vdot(g2, g2), eps)  # g1 -= c1 * g2
  c2 = conflict / jnp.maximum(tree_vdot(g1, g1), eps)  # g2 -= c2 * g1
  return jax.tree.map(lambda a, b: (a - c1 * b) + (b - c2 * a), g1, g2)


def path_name(path: Sequence[Any]) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def group_of(name: str) -> str | None:
  """The study group of a parameter path ('encoder/stage3/block1/conv/kernel' ->
  'encoder/stage3'); encoder stages, decoder levels, the segmentation head, CBAM modules and
  each classifier layer are groups of their own."""
  parts = name.split('/')
  if parts[0] in ('encoder', 'classifier') and len(parts) > 2:
    return '/'.join(parts[:2])
  return parts[0]


def pair_statistics(a: Any, b: Any, group: Callable[[str], str | None] = group_of,
                    aggregates: dict[str, Callable[[str], bool]] | None = None
                    ) -> dict[str, dict[str, Array]]:
  """Compares two gradients with the same structure, per parameter group.

  Returns:
    {group: {'a_norm', 'b_norm', 'cosine', 'conflict'}}: the l2 norms, the cosine similarity
    (NaN where either is zero), and the share of the group's parameters where the two have
    opposite signs (both nonzero).
    `aggregates` adds groups made of every parameter whose name satisfies a predicate
    (e.g. {'all': lambda n: True}).
  """
  acc: dict[str, list[Array]] = {}
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = jax.tree.leaves(b)
  for (path, x), y in zip(flat_a, flat_b):
    name = path_name(path)
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    s = jnp.stack([jnp.sum(x * x), jnp.sum(y * y), jnp.sum(x * y),
                   jnp.sum((x * y) < 0).astype(jnp.float32), jnp.float32(x.size)])
    targets = [group(name)] + [g for g, pred in (aggregates or {}).items() if pred(name)]
    for g in targets:
      if g is not None:
        acc[g] = acc.get(g, []) + [s]
  out = {}
  for g, parts in acc.items():
    aa, bb, ab, conflicts, n = sum(parts)
    na, nb = jnp.sqrt(aa), jnp.sqrt(bb)
    out[g] = {'a_norm': na, 'b_norm': nb,
              'cosine': jnp.where((na > 0) & (nb > 0), ab / jnp.maximum(na * nb, 1e-30), jnp.nan),
              'conflict': conflicts / n}
  return out
