"""Evaluation measures of the paper (§3.5, Tables 3-5) and the ones we add (ROC AUC).

Pure numpy on host data. Segmentation measures work from per-image confusion counts
(tp, fp, fn, tn), which the jitted eval step computes, so masks need not leave the device.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BENIGN, MELANOMA = 0, 1


# ---------------------------------------------------------------------------- segmentation

def _scores_from_counts(counts: np.ndarray) -> dict[str, np.ndarray]:
  c = np.asarray(counts, np.float64)
  tp, fp, fn, tn = c[..., 0], c[..., 1], c[..., 2], c[..., 3]
  perfect = (fp == 0) & (fn == 0)  # includes empty truth predicted empty
  with np.errstate(divide='ignore', invalid='ignore'):
    dice = np.where(perfect, 1.0, 2 * tp / (2 * tp + fp + fn))
    iou = np.where(perfect, 1.0, tp / (tp + fp + fn))
    den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    # MCC is undefined when a row or column of the confusion matrix is empty; a perfect
    # prediction then scores 1 and any other 0 (the usual convention), never NaN.
    mcc = np.where(den > 0, (tp * tn - fp * fn) / np.where(den > 0, den, 1.0),
                   np.where(perfect, 1.0, 0.0))
  return {'dice': dice, 'iou': iou, 'mcc': mcc}


def segmentation_scores(counts: np.ndarray) -> dict[str, Any]:
  """Dice, IoU and MCC per image averaged over images (the paper's), and pooled over pixels.

  Args:
    counts: (N, 4) per-image (tp, fp, fn, tn).
  Returns:
    {'dice', 'iou', 'mcc'} (means over images), {'dice_pooled', 'iou_pooled', 'mcc_pooled'},
    and 'per_image' with the (N,) arrays.
  """
  counts = np.asarray(counts)
  per_image = _scores_from_counts(counts)
  pooled = _scores_from_counts(counts.sum(axis=0))
  out = {k: float(np.mean(v)) for k, v in per_image.items()}
  out.update({f'{k}_pooled': float(v) for k, v in pooled.items()})
  out['per_image'] = per_image
  return out


# -------------------------------------------------------------------------- classification

def confusion_matrix(labels: np.ndarray, preds: np.ndarray) -> np.ndarray:
  """2x2 matrix, rows = truth (benign, melanoma), columns = prediction."""
  cm = np.zeros((2, 2), np.int64)
  np.add.at(cm, (np.asarray(labels, int), np.asarray(preds, int)), 1)
  return cm


def classification_scores_from_confusion(cm: np.ndarray) -> dict[str, float]:
  """The paper's classification measures from a 2x2 confusion matrix (rows = truth).

  tpr_weighted: support-weighted recall over both classes (= accuracy), Tables 3-4's "TPR".
  tnr: benign recall (specificity), Tables 3-4's "TNR".
  f1_weighted: support-weighted F1 over both classes.
  recall_melanoma / recall_benign: Table 5's unweighted TPR / TNR.
  The recall of a class the set has no example of is undefined: None (tnr too).
  """
  cm = np.asarray(cm, np.float64)
  support = cm.sum(axis=1)
  predicted = cm.sum(axis=0)
  diag = np.diag(cm)
  with np.errstate(divide='ignore', invalid='ignore'):
    recall = np.where(support > 0, diag / np.where(support > 0, support, 1), 0.0)
    precision = np.where(predicted > 0, diag / np.where(predicted > 0, predicted, 1), 0.0)
    f1 = np.where(precision + recall > 0, 2 * precision * recall /
                  np.where(precision + recall > 0, precision + recall, 1), 0.0)
  total = support.sum()
  weights = support / total if total else np.zeros(2)
  defined = lambda c: float(recall[c]) if support[c] > 0 else None
  return {
      'tpr_weighted': float(np.sum(weights * recall)),
      'tnr': defined(BENIGN),
      'f1_weighted': float(np.sum(weights * f1)),
      'recall_melanoma': defined(MELANOMA),
      'recall_benign': defined(BENIGN),
  }


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Area under the ROC curve (Mann-Whitney U, ties counted half). NaN with one class only."""
  labels, scores = np.asarray(labels, int), np.asarray(scores, np.float64)
  pos, neg = scores[labels == 1], scores[labels == 0]
  if len(pos) == 0 or len(neg) == 0:
    return float('nan')
  order = np.argsort(scores, kind='mergesort')
  ranks = np.empty(len(scores))
  sorted_scores = scores[order]
  # Average ranks over ties.
  _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
  avg = first + (counts - 1) / 2.0 + 1.0
  ranks[order] = np.repeat(avg, counts)
  u = ranks[labels == 1].sum() - len(pos) * (len(pos) + 1) / 2.0
  return float(u / (len(pos) * len(neg)))


def classification_scores(labels: np.ndarray, probs: np.ndarray,
                          threshold: float = 0.5) -> dict[str, Any]:
  """All classification measures from labels and melanoma probabilities.

  Returns the measures of `classification_scores_from_confusion`, 'auc', and 'confusion' as
  [[bb, bm], [mb, mm]] (a nested list, ready for JSON).
  """
  preds = (np.asarray(probs) >= threshold).astype(int)
  cm = confusion_matrix(labels, preds)
  out = classification_scores_from_confusion(cm)
  out['auc'] = roc_auc(labels, probs)
  out['confusion'] = cm.tolist()
  return out


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
  """Average precision of the melanoma score (the ISIC 2016 challenge's ranking measure):
  sum over thresholds of (recall step) x precision, ties counted as one threshold. NaN
  without positives."""
  labels, scores = np.asarray(labels, int), np.asarray(scores, np.float64)
  n_pos = int(labels.sum())
  if n_pos == 0:
    return float('nan')
  order = np.argsort(-scores, kind='mergesort')
  s, y = scores[order], labels[order]
  last_of_tie = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
  tp = np.cumsum(y)[last_of_tie]
  fp = (last_of_tie + 1) - tp
  precision = tp / (tp + fp)
  recall = tp / n_pos
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def bootstrap_ci(statistic, n: int, *, num_samples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
  """Percentile bootstrap interval of `statistic(indices)` over `n` resampled items (images).

  Args:
    statistic: maps an index array (a resample of range(n)) to a number; NaNs are ignored.
    n: number of items.
  Returns:
    (low, high) of the central `level` interval.
  """
  rng = np.random.default_rng(seed)
  values = np.array([statistic(rng.integers(0, n, n)) for _ in range(num_samples)], np.float64)
  values = values[np.isfinite(values)]
  if not len(values):
    return float('nan'), float('nan')
  tail = (1 - level) / 2 * 100
  lo, hi = np.percentile(values, [tail, 100 - tail])
  return float(lo), float(hi)


# ------------------------------------------------------------------------------ calibration

ECE_BINS = 15


def reliability(labels: np.ndarray, probs: np.ndarray,
                num_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
  """Per equal-width bin of the melanoma probability ([0, 1/B), ..., [(B-1)/B, 1]): 'count',
  'mean_prob' (the mean predicted probability) and 'frequency' (the share of melanomas); NaN
  for an empty bin. What the reliability diagram shows and ECE sums."""
  labels, probs = np.asarray(labels, np.float64), np.asarray(probs, np.float64)
  bins = np.minimum((probs * num_bins).astype(int), num_bins - 1)
  count = np.bincount(bins, minlength=num_bins).astype(np.float64)
  with np.errstate(invalid='ignore', divide='ignore'):
    mean_prob = np.bincount(bins, probs, minlength=num_bins) / count
    frequency = np.bincount(bins, labels, minlength=num_bins) / count
  return {'count': count, 'mean_prob': mean_prob, 'frequency': frequency}


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray,
                               num_bins: int = ECE_BINS) -> float:
  """ECE of the melanoma probability: over `num_bins` equal-width bins, the image-weighted
  mean of |share of melanomas - mean probability| (Naeini et al. 2015; Guo et al. 2017 use 15
  bins). 0 is perfectly calibrated."""
  r = reliability(labels, probs, num_bins)
  full = r['count'] > 0
  gap = np.abs(r['frequency'][full] - r['mean_prob'][full])
  return float(np.sum(r['count'][full] * gap) / np.sum(r['count']))


def brier_score(labels: np.ndarray, probs: np.ndarray) -> float:
  """Mean squared error of the melanoma probability against the 0/1 label (lower is better;
  0.25 for a constant 0.5)."""
  labels, probs = np.asarray(labels, np.float64), np.asarray(probs, np.float64)
  return float(np.mean((probs - labels) ** 2))
