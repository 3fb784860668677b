"""Metrics against the paper's own confusion matrices and hand-computed cases."""

import numpy as np
import pytest

from skinmtl_jax import metrics, steps


def _counts(pred, truth):
  """Per-image counts of binary masks, by the eval step's own counting (steps.seg_counts)."""
  return np.asarray(steps.seg_counts(np.asarray(pred, np.float32), np.asarray(truth), 0.5))


@pytest.mark.parametrize('cm,tpr,tnr,f1', [
    ([[261, 43], [40, 35]], 78.10, 85.86, 78.26),   # Table 3, ResNet50
    ([[248, 56], [17, 58]], 80.74, 81.58, 82.07),   # Table 3, MTL4
    ([[152, 8], [24, 16]], 84.00, 95.00, 82.38),    # Table 4, ResNet50 on PH2
])
def test_paper_classification_measures(cm, tpr, tnr, f1):
  s = metrics.classification_scores_from_confusion(np.array(cm))
  assert round(100 * s['tpr_weighted'], 2) == tpr
  assert round(100 * s['tnr'], 2) == tnr
  assert round(100 * s['f1_weighted'], 2) == f1


def test_table5_unweighted_recalls():
  s = metrics.classification_scores_from_confusion(np.array([[248, 56], [17, 58]]))
  assert s['recall_melanoma'] == pytest.approx(58 / 75)
  assert s['recall_benign'] == pytest.approx(248 / 304)


def test_confusion_and_threshold():
  labels = np.array([0, 0, 1, 1, 1])
  probs = np.array([0.1, 0.6, 0.4, 0.5, 0.9])
  s = metrics.classification_scores(labels, probs, threshold=0.5)
  assert s['confusion'] == [[1, 1], [1, 2]]


def test_auc_hand_computed():
  # Positives 0.8, 0.4; negatives 0.5, 0.1, 0.4. Pairs won: 0.8 beats all 3; 0.4 beats 0.1,
  # ties 0.4 (half). AUC = (3 + 1.5) / 6 = 0.75.
  labels = np.array([1, 1, 0, 0, 0])
  scores = np.array([0.8, 0.4, 0.5, 0.1, 0.4])
  assert metrics.roc_auc(labels, scores) == pytest.approx(0.75)
  assert metrics.roc_auc(np.array([1, 1, 0]), np.array([0.9, 0.8, 0.1])) == 1.0
  assert np.isnan(metrics.roc_auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_segmentation_hand_made_masks():
  truth = np.zeros((1, 4, 4), bool)
  truth[0, :2, :2] = True                       # 4 pixels
  pred = np.zeros((1, 4, 4), bool)
  pred[0, :2, :3] = True                        # 6 pixels, 4 overlap
  counts = _counts(pred, truth)
  assert counts.tolist() == [[4, 2, 0, 10]]
  s = metrics.segmentation_scores(counts)
  assert s['dice'] == pytest.approx(8 / 10)
  assert s['iou'] == pytest.approx(4 / 6)
  assert s['mcc'] == pytest.approx((4 * 10 - 2 * 0) / np.sqrt(6 * 4 * 12 * 10))


def test_empty_masks_give_no_nan():
  empty = np.zeros((1, 4, 4), bool)
  full = np.ones((1, 4, 4), bool)
  some = np.zeros((1, 4, 4), bool)
  some[0, 0, 0] = True
  both_empty = metrics.segmentation_scores(_counts(empty, empty))
  assert (both_empty['dice'], both_empty['iou'], both_empty['mcc']) == (1.0, 1.0, 1.0)
  miss = metrics.segmentation_scores(_counts(empty, some))
  assert (miss['dice'], miss['iou'], miss['mcc']) == (0.0, 0.0, 0.0)
  false_alarm = metrics.segmentation_scores(_counts(some, empty))
  assert (false_alarm['dice'], false_alarm['mcc']) == (0.0, 0.0)
  all_lesion = metrics.segmentation_scores(_counts(full, full))
  assert all_lesion['mcc'] == 1.0 and all_lesion['dice'] == 1.0


def test_per_image_mean_differs_from_pooled():
  truth = np.zeros((2, 4, 4), bool)
  truth[0] = True                               # a large lesion, perfectly found
  truth[1, 0, 0] = True                         # a one-pixel lesion, missed
  pred = truth.copy()
  pred[1] = False
  s = metrics.segmentation_scores(_counts(pred, truth))
  assert s['dice'] == pytest.approx(0.5)
  assert s['dice_pooled'] == pytest.approx(2 * 16 / (2 * 16 + 1))


def test_average_precision_hand_computed():
  # Ranked: P, N, P, N -> precision at the positives 1/1 and 2/3; AP = (1 + 2/3) / 2.
  assert metrics.average_precision(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1])) == \
      pytest.approx(5 / 6)
  # A tie between a positive and a negative is one threshold: precision 1/2 there.
  assert metrics.average_precision(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)
  assert np.isnan(metrics.average_precision(np.array([0, 0]), np.array([0.1, 0.2])))


def test_bootstrap_interval_brackets_the_statistic():
  x = np.random.default_rng(1).normal(10, 2, 400)
  lo, hi = metrics.bootstrap_ci(lambda idx: x[idx].mean(), len(x), num_samples=500)
  assert lo < x.mean() < hi
  se = x.std() / np.sqrt(len(x))
  assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.2)   # the normal-theory width
  assert metrics.bootstrap_ci(lambda idx: 3.0, 10) == (3.0, 3.0)


def test_the_recall_of_a_class_the_set_lacks_is_undefined_not_zero():
  s = metrics.classification_scores_from_confusion(np.array([[3, 1], [0, 0]]))
  assert s['recall_melanoma'] is None and s['tnr'] == s['recall_benign'] == 0.75
  s = metrics.classification_scores_from_confusion(np.array([[0, 0], [1, 2]]))
  assert s['tnr'] is None and s['recall_melanoma'] == pytest.approx(2 / 3)
