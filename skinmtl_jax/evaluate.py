"""Evaluation of a train state on a dataset split: the measures of `metrics.py`."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from skinmtl_jax import input_pipeline, metrics

SEG_KEYS = ('dice', 'iou', 'mcc')
CLS_KEYS = ('f1_weighted', 'tpr_weighted', 'tnr', 'auc', 'confusion')


def evaluate_split(eval_step, state, split: input_pipeline.Split, *, batch_size: int,
                   threshold: float) -> dict[str, Any]:
  """Runs the jitted `eval_step` over every example of `split` once.

  Returns the metrics.json entry: segmentation and classification measures (None for a task
  the model does not have), 'n', and 'per_image' (ids, labels, probabilities, scores) for
  reports.
  """
  counts, probs, ids = [], [], []
  for batch, batch_ids in input_pipeline.eval_batches(split, batch_size):
    valid = batch.pop('valid')
    out = jax.device_get(eval_step(state, batch))
    ids += batch_ids
    if 'seg_counts' in out:
      counts.append(out['seg_counts'][valid])
    if 'melanoma_prob' in out:
      probs.append(out['melanoma_prob'][valid])
  labels = split.labels
  result: dict[str, Any] = {k: None for k in SEG_KEYS + CLS_KEYS}
  per_image: dict[str, Any] = {'id': ids, 'label': labels.tolist()}
  if counts:
    seg = metrics.segmentation_scores(np.concatenate(counts))
    per_image.update({k: v.tolist() for k, v in seg.pop('per_image').items()})
    result.update(seg)
  if probs:
    p = np.concatenate(probs).astype(np.float64)
    result.update(metrics.classification_scores(labels, p, threshold))
    per_image['melanoma_prob'] = p.tolist()
  result['n'] = len(ids)
  result['per_image'] = per_image
  return result
