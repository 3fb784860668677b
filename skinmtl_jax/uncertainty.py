"""How sure the second opinion is: the spread of its opinions, the decision's operating point,
the review flag, and whether the flag finds the errors.

Opinions. The K members of a seed ensemble, each on the V views of an image (the 8 flips and
turns with predict's --tta, else 1), give N = K x V opinions: N melanoma probabilities p_n and
N lesion probability maps, whose mean is the prediction. Per image (`melanoma_measures`,
`mask_measures`):

  melanoma_prob_std    the standard deviation of the p_n (of the N opinions at hand: ddof 0)
  melanoma_prob_range  max p_n - min p_n
  mutual_information   H(mean p) - mean H(p_n), in bits (0 to 1): the mutual information
                       between the prediction and the opinion (BALD; Houlsby et al. 2011), the
                       part of the prediction's entropy that comes from the opinions
                       disagreeing; 0 when they agree, however unsure each one is
  votes_melanoma       how many of the N opinions are at or above the decision's threshold
  mask_dice_between    the mean Dice between the opinions' masks over all pairs (two empty
                       masks agree: 1)
  mask_disagreement    the share of the image's pixels that some opinions call lesion and
                       others not

and per pixel (`binary_entropy` of the mean lesion probability, in bits; where the masks
disagree) predict's <name>_uncertainty.png and the overlay's marks. One opinion (one member,
no --tta) has none of these: they are missing, never 0.

The operating point (`fit_operating_point`). The decision predict prints is taken at the
threshold on the (averaged, uncalibrated) melanoma probability that finds
decision.target_sensitivity of the validation split's melanomas: the k-th highest melanoma
probability, k = ceil(target x melanomas). A split of ~14 melanomas fixes it loosely, so
decision.json records its 95 % bootstrap interval over the validation images; the validation
sensitivity and specificity at it with Wilson intervals (in-sample: the threshold was chosen
on these images); and the out-of-bag sensitivity (the threshold chosen on each bootstrap
resample, measured on the melanomas the resample left out): what to expect on new images.

The review flag (`review`). An image is flagged for any of these reasons:

  decision_disagreement  the opinions disagree on the decision (0 < votes_melanoma < N)
  mask_agreement         mask_dice_between below its decision.review_share quantile on the
                         validation split (the ensemble's least agreed masks there)
  near_threshold         the probability inside the operating threshold's 95 % interval: a
                         threshold the validation split supports as well decides otherwise
  lesion_at_border       the mask touches the image's border (the lesion may go on outside)
  lesion_empty           no lesion found

Its thresholds are fitted on the validation split with the operating point (`fit_decision`)
and stored in decision.json, tied like calibration.json to its checkpoint's model. A reason
whose measure is unavailable (one opinion, no fitted threshold, a single-task model) is not
checked, and the records say so.

Does it work (`assess`). On every set: the error rates (the decision wrong; Dice below
decision.seg_error_dice) among flagged and unflagged images and per reason, the ROC AUC of
each measure for finding an error, and the referral curves (`referral_curve`: the error rate
of the images kept against the share referred, most uncertain first).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from skinmtl_jax import calibration as calibration_lib
from skinmtl_jax import metrics

FILE_NAME = 'decision.json'
REASONS = ('decision_disagreement', 'mask_agreement', 'near_threshold', 'lesion_at_border',
           'lesion_empty')
# The per-image columns of evaluation that the fit reads (per_image_<set>.csv).
MASK_COLUMNS = ('mask_dice_between', 'mask_disagreement', 'lesion_at_border', 'lesion_empty')
MELANOMA_COLUMNS = ('melanoma_prob_std', 'melanoma_prob_range', 'mutual_information',
                    'votes_melanoma')
# The uncertainty scores `assess` judges (higher: less sure), with their names in the report.
SCORES = (('melanoma_prob_std', 'melanoma probability: std across opinions'),
          ('melanoma_prob_range', 'melanoma probability: range across opinions'),
          ('mutual_information', 'mutual information (BALD)'),
          ('votes_against', 'share of opinions against the decision'),
          ('near_threshold', 'probability near the threshold: -|p - t|'),
          ('mask_dice_between', 'mask: 1 - mean Dice between opinions'),
          ('mask_disagreement', 'mask: share of pixels where opinions disagree'),
          ('review', 'the review flag'))


class DecisionConfig(NamedTuple):
  """config.decision, read once: the operating point's melanoma sensitivity on the validation
  split (0: decide at config.threshold), the share of validation images whose mask agreement
  is flagged, and the Dice below which a mask counts as an error when the flag is judged."""
  target_sensitivity: float = 0.9
  review_share: float = 0.1
  seg_error_dice: float = 0.7

  @classmethod
  def from_config(cls, decision_cfg) -> 'DecisionConfig':
    # .get: a group without a field (made by hand, not by config_base) reads the default.
    return cls(**{k: type(v)(decision_cfg.get(k, v)) for k, v in cls._field_defaults.items()})


# ------------------------------------------------------------------ per image and per pixel

def binary_entropy(p):
  """Entropy in bits of a yes/no outcome of probability `p` (0 at 0 and 1, 1 at 0.5)."""
  p = jnp.clip(jnp.asarray(p, jnp.float32), 0.0, 1.0)
  return (jax.scipy.special.entr(p) + jax.scipy.special.entr(1 - p)) / math.log(2)


def melanoma_measures(probs, threshold: float) -> dict[str, Any]:
  """The spread of the opinions' melanoma probabilities `probs` (N, B) per image (B,):
  melanoma_prob_std, melanoma_prob_range, mutual_information (bits) and votes_melanoma (how
  many are >= `threshold`); {} for one opinion (N = 1). Opinions that agree give exactly 0."""
  p = jnp.asarray(probs, jnp.float32)
  if p.shape[0] < 2:
    return {}
  d = p - p[0]  # about the first opinion: exactly 0 where all agree (no rounding of a mean)
  mean = p[0] + d.mean(0)
  var = jnp.maximum((d * d).mean(0) - d.mean(0) ** 2, 0.0)
  mi = binary_entropy(mean) - binary_entropy(p).mean(0)
  return {'melanoma_prob_std': jnp.sqrt(var), 'melanoma_prob_range': p.max(0) - p.min(0),
          'mutual_information': jnp.maximum(mi, 0.0),
          'votes_melanoma': jnp.sum(p >= threshold, axis=0, dtype=jnp.int32)}


def mask_measures(lesion_probs, threshold: float) -> dict[str, Any]:
  """Per image (B,) of the opinions' lesion probabilities `lesion_probs` (N, B, H, W), masks
  at `threshold`: lesion_empty and lesion_at_border of the mean's mask (any N), and with two
  or more opinions mask_dice_between and mask_disagreement (see the module's docstring)."""
  p = jnp.asarray(lesion_probs, jnp.float32)
  n, b = p.shape[:2]
  mean = p.mean(0) >= threshold
  border = (mean[:, 0].any(-1) | mean[:, -1].any(-1) | mean[:, :, 0].any(-1)
            | mean[:, :, -1].any(-1))
  out = {'lesion_empty': ~mean.any((1, 2)), 'lesion_at_border': border}
  if n < 2:
    return out
  masks = p >= threshold
  flat = masks.reshape(n, b, -1).astype(jnp.float32)
  inter = jnp.einsum('nbp,mbp->bnm', flat, flat)
  size = flat.sum(-1).T                                     # (B, N)
  den = size[:, :, None] + size[:, None, :]
  dice = jnp.where(den > 0, 2 * inter / jnp.maximum(den, 1.0), 1.0)
  i, j = np.triu_indices(n, 1)
  out['mask_dice_between'] = dice[:, i, j].mean(-1)
  out['mask_disagreement'] = (masks.any(0) & ~masks.all(0)).mean((1, 2))
  return out


# ------------------------------------------------------------------ the decision's operating point

def sensitivity_threshold(labels, probs, target: float) -> float | None:
  """The highest threshold at which `probs` >= threshold finds `target` of the melanomas:
  the k-th highest melanoma probability, k = ceil(target x melanomas). None without one."""
  labels, probs = np.asarray(labels), np.asarray(probs, np.float64)
  pos = np.sort(probs[labels == 1])[::-1]
  if not len(pos):
    return None
  k = min(len(pos), max(1, math.ceil(target * len(pos) - 1e-9)))
  return float(pos[k - 1])


def wilson_interval(k: int, n: int, z: float = 1.959964) -> list[float] | None:
  """The Wilson score interval (95 % by default) of a proportion k / n; None for n = 0."""
  if n == 0:
    return None
  p = k / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return [max(0.0, centre - half), min(1.0, centre + half)]


def fit_operating_point(labels, probs, target: float, *, bootstrap_samples: int = 1000,
                        seed: int = 0) -> dict[str, Any] | None:
  """The operating point reaching melanoma sensitivity `target` on (`labels`, `probs`), the
  validation split; None without melanomas or benign images.

  Returns {'target_sensitivity', 'threshold', 'threshold_ci95' (percentile bootstrap over the
  images), 'sensitivity' and 'specificity' at it with 'sensitivity_ci95' / 'specificity_ci95'
  (Wilson), 'sensitivity_out_of_bag' (see the module's docstring), 'melanomas', 'benign',
  'bootstrap_samples'}.
  """
  labels, probs = np.asarray(labels, int), np.asarray(probs, np.float64)
  n_pos, n_neg = int(labels.sum()), int((1 - labels).sum())
  if n_pos == 0 or n_neg == 0:
    return None
  t = sensitivity_threshold(labels, probs, target)
  rng = np.random.default_rng(seed)
  thresholds, oob = [], []
  n = len(labels)
  for _ in range(bootstrap_samples):
    idx = rng.integers(0, n, n)
    tb = sensitivity_threshold(labels[idx], probs[idx], target)
    if tb is None:
      continue  # a resample without melanomas
    thresholds.append(tb)
    left_out = np.ones(n, bool)
    left_out[idx] = False
    left_out &= labels == 1
    if left_out.any():
      oob.append(np.mean(probs[left_out] >= tb))
  tp = int(np.sum(probs[labels == 1] >= t))
  tn = int(np.sum(probs[labels == 0] < t))
  lo, hi = (np.percentile(thresholds, [2.5, 97.5]) if thresholds else (t, t))
  return {'target_sensitivity': float(target), 'threshold': t,
          'threshold_ci95': [float(lo), float(hi)],
          'sensitivity': tp / n_pos, 'sensitivity_ci95': wilson_interval(tp, n_pos),
          'specificity': tn / n_neg, 'specificity_ci95': wilson_interval(tn, n_neg),
          'sensitivity_out_of_bag': float(np.mean(oob)) if oob else None,
          'melanomas': n_pos, 'benign': n_neg, 'bootstrap_samples': int(bootstrap_samples)}


def num_members(per_image: dict[str, list]) -> int:
  """How many members evaluation's per-image columns come from (their own columns, K > 1)."""
  return max(1, sum(k.startswith('dice_member') for k in per_image),
             sum(k.startswith('melanoma_prob_member') for k in per_image))


def member_probs(per_image: dict[str, list]) -> np.ndarray | None:
  """The opinions' melanoma probabilities (K, N) of evaluation's per-image columns (each
  member's, or the single model's), or None without a classifier."""
  cols = sorted((k for k in per_image if k.startswith('melanoma_prob_member')),
                key=lambda k: int(k[len('melanoma_prob_member'):]))
  if cols:
    return np.asarray([per_image[k] for k in cols], np.float64)
  if 'melanoma_prob' in per_image:
    return np.asarray([per_image['melanoma_prob']], np.float64)
  return None


def fit_decision(labels, per_image: dict[str, list], cfg: DecisionConfig, *,
                 calibration: dict[str, Any] | None = None,
                 bootstrap_samples: int = 1000) -> dict[str, Any]:
  """The operating point and the review flag's thresholds, fitted on the validation split's
  per-image outputs (evaluation's per_image: 'melanoma_prob' of the prediction, the members'
  'melanoma_prob_member<i>', and the MASK_COLUMNS).

  Returns decision.json's content (without its step and model): 'operating_point' (see
  `fit_operating_point`, with 'threshold_calibrated' when a calibration is given) or None
  with 'operating_point_missing' saying why; 'review': 'mask_dice_min' (None without
  ensemble masks) and 'near_threshold' (the operating threshold's interval, or None);
  'fitted_on' (images, melanomas, members).
  """
  labels = np.asarray(labels, int)
  probs = per_image.get('melanoma_prob')
  out: dict[str, Any] = {
      'target_sensitivity': cfg.target_sensitivity, 'review_share': cfg.review_share,
      'fitted_on': {'split': 'validation', 'images': len(labels),
                    'melanomas': int(labels.sum()), 'members': num_members(per_image),
                    'views': 1}}
  op, missing = None, None
  if probs is None:
    missing = 'the model has no classifier'
  elif cfg.target_sensitivity <= 0:
    missing = 'decision.target_sensitivity is 0: the decision is at config.threshold'
  else:
    op = fit_operating_point(labels, probs, cfg.target_sensitivity,
                             bootstrap_samples=bootstrap_samples)
    if op is None:
      missing = (f'the validation split has {int(labels.sum())} melanomas and '
                 f'{int((1 - labels).sum())} benign images (both are needed)')
    elif calibration is not None:
      op['threshold_calibrated'] = float(calibration_lib.apply(op['threshold'], calibration))
  out['operating_point'] = op
  if missing:
    out['operating_point_missing'] = missing
  dice = per_image.get('mask_dice_between')
  out['review'] = {
      'mask_dice_min': (float(np.quantile(np.asarray(dice, np.float64), cfg.review_share))
                        if dice is not None and len(dice) else None),
      'near_threshold': None if op is None else list(op['threshold_ci95'])}
  return out


def decision_threshold(decision: dict[str, Any] | None, fallback: float) -> tuple[float, str]:
  """(threshold, its name in words) of the decision: the fitted operating point's, else
  `fallback` (config.threshold)."""
  op = (decision or {}).get('operating_point')
  if op is None:
    why = (decision or {}).get('operating_point_missing', 'none fitted for this checkpoint')
    return fallback, f'the run\'s threshold {fallback:g} (no operating point: {why})'
  lo, hi = op['threshold_ci95']
  calibrated = (f'; melanoma_prob_calibrated >= {op["threshold_calibrated"]:.3f}'
                if op.get('threshold_calibrated') is not None else '')
  return op['threshold'], (f'melanoma sensitivity {op["target_sensitivity"]:.2f} on the '
                           f'validation split: melanoma_prob >= {op["threshold"]:.3f} (95 % '
                           f'interval {lo:.3f}-{hi:.3f}, {op["melanomas"]} melanomas'
                           f'{calibrated})')


# ------------------------------------------------------------------ the review flag

def image_measures(per_image: dict[str, list], threshold: float) -> dict[str, np.ndarray]:
  """Every per-image measure available in evaluation's per_image (the members' probabilities,
  the MASK_COLUMNS), with decision `threshold` for the votes; 'opinions' is N."""
  out: dict[str, Any] = {k: np.asarray(per_image[k]) for k in MASK_COLUMNS if k in per_image}
  members = member_probs(per_image)
  if members is not None:
    out.update({k: np.asarray(v) for k, v in melanoma_measures(members, threshold).items()})
  out['opinions'] = num_members(per_image)
  return out


def review(measures: dict[str, Any], probs, decision: dict[str, Any] | None,
           num_opinions: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """The review flag's reasons per image: ({reason: (B,) bool} for the reasons checked,
  {reason: why not} for the others). `measures` are `melanoma_measures` and `mask_measures`
  of `num_opinions` opinions, `probs` (B,) the prediction's melanoma probability (or None),
  `decision` decision.json's content (or None)."""
  reasons, unchecked = {}, {}
  review_cfg = (decision or {}).get('review') or {}
  one = num_opinions < 2
  if 'votes_melanoma' in measures:
    v = np.asarray(measures['votes_melanoma'])
    reasons['decision_disagreement'] = (v > 0) & (v < num_opinions)
  else:
    unchecked['decision_disagreement'] = ('one opinion (one member, no --tta)' if one
                                          else 'no classifier')
  if 'mask_dice_between' in measures and review_cfg.get('mask_dice_min') is not None:
    reasons['mask_agreement'] = (np.asarray(measures['mask_dice_between'])
                                 < review_cfg['mask_dice_min'])
  elif 'lesion_empty' not in measures:
    unchecked['mask_agreement'] = 'no segmentation'
  elif one:
    unchecked['mask_agreement'] = 'one opinion (one member, no --tta)'
  else:
    unchecked['mask_agreement'] = ('no threshold fitted (the validation split gave one '
                                   'opinion per image, or there was none)')
  if probs is not None and review_cfg.get('near_threshold') is not None:
    lo, hi = review_cfg['near_threshold']
    p = np.asarray(probs)
    reasons['near_threshold'] = (p >= lo) & (p <= hi)
  else:
    unchecked['near_threshold'] = 'no classifier' if probs is None else (
        'no operating point fitted: ' + (decision or {}).get('operating_point_missing',
                                                            'no decision.json'))
  for r in ('lesion_at_border', 'lesion_empty'):
    if r in measures:
      reasons[r] = np.asarray(measures[r], bool)
    else:
      unchecked[r] = 'no segmentation'
  return reasons, unchecked


def flagged(reasons: dict[str, np.ndarray], n: int) -> np.ndarray:
  """Whether each of `n` images is flagged: any reason."""
  out = np.zeros(n, bool)
  for v in reasons.values():
    out |= np.asarray(v, bool)
  return out


# ------------------------------------------------------------------ does it work

def scores(measures: dict[str, Any], probs, threshold: float,
           flag: np.ndarray) -> dict[str, np.ndarray]:
  """The uncertainty scores of SCORES available (higher: less sure) per image."""
  out = {k: np.asarray(measures[k], np.float64) for k in
         ('melanoma_prob_std', 'melanoma_prob_range', 'mutual_information', 'mask_disagreement')
         if k in measures}
  if 'mask_dice_between' in measures:
    out['mask_dice_between'] = 1 - np.asarray(measures['mask_dice_between'], np.float64)
  if probs is not None:
    p = np.asarray(probs, np.float64)
    out['near_threshold'] = -np.abs(p - threshold)
    if 'votes_melanoma' in measures:
      v = np.asarray(measures['votes_melanoma'], np.float64)
      n = measures['opinions']
      out['votes_against'] = np.where(p >= threshold, n - v, v) / n
  out['review'] = flag.astype(np.float64)
  return {k: out[k] for k, _ in SCORES if k in out}


def errors(labels, per_image: dict[str, list], threshold: float,
           seg_error_dice: float) -> dict[str, np.ndarray]:
  """Per image: 'decision_wrong' (the decision at `threshold` is not the label) and
  'dice_below' (the mask's Dice below `seg_error_dice`), where the model has the task."""
  out = {}
  if 'melanoma_prob' in per_image:
    out['decision_wrong'] = ((np.asarray(per_image['melanoma_prob']) >= threshold)
                             != (np.asarray(labels) == 1))
  if 'dice' in per_image:
    out['dice_below'] = np.asarray(per_image['dice']) < seg_error_dice
  return out


def referral_curve(score, error) -> tuple[np.ndarray, np.ndarray]:
  """(share referred, error rate of the images kept) when the images are referred most
  uncertain (highest `score`) first; ties in the order given. Ends with one image kept."""
  error = np.asarray(error, np.float64)
  order = np.argsort(-np.asarray(score, np.float64), kind='stable')
  n = len(error)
  referred_errors = np.r_[0.0, np.cumsum(error[order])][:n]
  kept = n - np.arange(n)
  return np.arange(n) / n, (error.sum() - referred_errors) / kept


def _rates(mask: np.ndarray, errs: dict[str, np.ndarray]) -> dict[str, Any]:
  n = int(mask.sum())
  out: dict[str, Any] = {'n': n, 'share': n / len(mask) if len(mask) else None}
  for k in ('decision_wrong', 'dice_below'):
    if k in errs:
      out[f'{k}_n'] = int(errs[k][mask].sum())
      out[k] = float(errs[k][mask].mean()) if n else None
    else:
      out[f'{k}_n'], out[k] = None, None
  return out


def assess(labels, per_image: dict[str, list], decision: dict[str, Any] | None, *,
           fallback_threshold: float, seg_error_dice: float) -> dict[str, Any]:
  """Whether the review flag and each measure find the errors on one set: 'threshold' and
  'operating_point' (its name) of the decision; 'flagged', 'not_flagged', 'all' and
  'by_reason' ({'n', 'share', 'decision_wrong', 'dice_below' and their counts '_n'});
  'unchecked' ({reason: why}); 'auc' ({score: {'decision_wrong', 'dice_below'}}, None where
  a set has no error or no correct case); and 'per_image' (the measures, reasons, flag and
  scores, for the CSV and the referral figure)."""
  labels = np.asarray(labels)
  n = len(labels)
  t, name = decision_threshold(decision, fallback_threshold)
  measures = image_measures(per_image, t)
  probs = per_image.get('melanoma_prob')
  reasons, unchecked = review(measures, probs, decision, measures['opinions'])
  flag = flagged(reasons, n)
  errs = errors(labels, per_image, t, seg_error_dice)
  sc = scores(measures, probs, t, flag)
  auc = {}
  for k, v in sc.items():
    auc[k] = {}
    for e in ('decision_wrong', 'dice_below'):
      a = metrics.roc_auc(errs[e].astype(int), v) if e in errs else float('nan')
      auc[k][e] = a if np.isfinite(a) else None
  columns = {**{k: np.asarray(v).tolist() for k, v in measures.items() if k != 'opinions'},
             **{f'review_{k}': v.astype(int).tolist() for k, v in reasons.items()},
             'review': flag.astype(int).tolist()}
  return {'threshold': t, 'operating_point': name, 'opinions': measures.get('opinions'),
          'flagged': _rates(flag, errs), 'not_flagged': _rates(~flag, errs),
          'all': _rates(np.ones(n, bool), errs),
          'by_reason': {k: _rates(np.asarray(v, bool), errs) for k, v in reasons.items()},
          'unchecked': unchecked, 'auc': auc,
          'per_image': {'columns': columns, 'scores': sc, 'errors': errs}}


def at_operating_point(labels, probs, decision: dict[str, Any] | None, *,
                       bootstrap_samples: int = 1000) -> dict[str, Any] | None:
  """Sensitivity (melanoma recall) and specificity (benign recall) of `probs` at the fitted
  operating point on one set, with 95 % bootstrap intervals over its images, and the
  confusion matrix; None without an operating point."""
  op = (decision or {}).get('operating_point')
  if op is None or probs is None:
    return None
  labels, probs = np.asarray(labels, int), np.asarray(probs, np.float64)
  t = op['threshold']
  cm = metrics.confusion_matrix(labels, (probs >= t).astype(int))
  out = {'threshold': t, 'confusion': cm.tolist(), 'ci95': {}}
  for key, cls in (('sensitivity', 1), ('specificity', 0)):
    total = cm[cls].sum()
    out[key] = float(cm[cls, cls] / total) if total else None

    def stat(idx, cls=cls):
      y, p = labels[idx], probs[idx]
      sel = y == cls
      return float(np.mean((p[sel] >= t) == bool(cls))) if sel.any() else float('nan')
    if bootstrap_samples and total:
      out['ci95'][key] = list(metrics.bootstrap_ci(stat, len(labels),
                                                   num_samples=bootstrap_samples))
  return out


# ------------------------------------------------------------------ decision.json

def _validated(c: Any) -> dict[str, Any]:
  if not isinstance(c, dict) or not isinstance(c.get('review'), dict):
    raise calibration_lib.Invalid('expected an object with "review"')
  op = c.get('operating_point')
  numbers = [] if op is None else [op.get('threshold'), *op.get('threshold_ci95', [None] * 2)]
  numbers += [v for v in [c['review'].get('mask_dice_min'),
                          *(c['review'].get('near_threshold') or [])] if v is not None]
  for v in numbers:
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1):
      raise calibration_lib.Invalid(f'threshold {v!r} is not a number in [0, 1]')
  return c


def save(workdir: str, decision: dict[str, Any] | None, step: int, model: str) -> None:
  """Writes `workdir/decision.json` for checkpoint `step` of the model with fingerprint
  `model` (removes it for None)."""
  calibration_lib.save_fitted(workdir, FILE_NAME, decision, step, model)


def load(workdir: str, step: int, model: str | None = None, *,
         warn_missing: bool = False) -> dict[str, Any] | None:
  """decision.json fitted for checkpoint `step` (and the model `model`), or None with a
  warning (see calibration.load_fitted)."""
  return calibration_lib.load_fitted(workdir, FILE_NAME, step, model, _validated,
                                     warn_missing=warn_missing,
                                     what='no operating point or review thresholds')
