"""Every file an evaluation leaves (`write`): metrics.json; report.md (our rows in the layout of
the paper's Tables 3-4 beside the paper's, the calibration, the decisions at the operating
point, and whether the review flag finds the errors); per_image_<set>.csv; calibration.json and
decision.json when they were fitted (their format is skinmtl_jax/calibration.py's and
skinmtl_jax/uncertainty.py's); and the figures: boxplot_<set>.png, roc_<set>.png,
reliability_<set>.png, overlays_<set>.png, referral_<set>.png, and curves.png (training curves
from scalars.jsonl). Every file is written whole or not at all (workdir.atomic_write). The
measures themselves come from skinmtl_jax/evaluate.py, as an `Evaluation`.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from skinmtl_jax import calibration as calibration_lib
from skinmtl_jax import metrics, paper, splits, uncertainty
from skinmtl_jax import workdir as workdir_lib


class SetOutputs(NamedTuple):
  """What the report shows of one set beyond its entry in metrics.json."""
  split: splits.Split  # the set's images, for the overlays
  per_image: dict[str, list]  # per_image_<set>.csv's columns, the review's included
  review: dict[str, Any]  # uncertainty.assess's result with its per-image part: the referral
  calibrated_prob: np.ndarray | None = None  # after calibration, for the reliability diagram


class Evaluation(NamedTuple):
  """The measures of one evaluation as plain data (evaluate.evaluate's result)."""
  results: dict[str, Any]  # metrics.json's content
  # The validation split's, when the calibration and the decision were fitted on it now (they
  # are then saved as calibration.json and decision.json); None when they were loaded.
  validation: SetOutputs | None
  sets: dict[str, SetOutputs]  # by evaluation set name, in the order evaluated
  # The checkpoint's step and its model's fingerprint, which tie calibration.json and
  # decision.json to it.
  step: int
  fingerprint: str


def write(workdir: str, evaluation: Evaluation, predict_fn: Callable[[np.ndarray], dict], *,
          experiment: str, arch: str, threshold: float, seg_error_dice: float) -> None:
  """Writes every file of `evaluation` into `workdir` (see the module's docstring).

  `predict_fn` maps images (N, H, W, 3) to the model's outputs (the overlays' masks and
  probabilities); `experiment` names the run in headings and titles, `arch` (config.model.arch)
  adds a note for ResNet-50; `threshold` and `seg_error_dice` are the run's (config.threshold,
  config.decision.seg_error_dice).
  """
  results = evaluation.results
  path = lambda name: os.path.join(workdir, name)
  fitted = evaluation.validation
  if fitted is not None:
    calibration_lib.save(workdir, results['calibration'], evaluation.step,
                         evaluation.fingerprint)
    uncertainty.save(workdir, results['decision'], evaluation.step, evaluation.fingerprint)
    write_per_image(path('per_image_validation.csv'), fitted.per_image)
    referral(path('referral_validation.png'), fitted.review,
             f'{experiment}: validation (in-sample)', seg_error_dice=seg_error_dice)
  for name, out in evaluation.sets.items():
    r, per_image, title = results[name], out.per_image, f'{experiment}: {name}'
    referral(path(f'referral_{name}.png'), out.review, title, seg_error_dice=seg_error_dice)
    write_per_image(path(f'per_image_{name}.csv'), per_image)
    if r['dice'] is not None:
      boxplot(path(f'boxplot_{name}.png'), per_image, title)
    if r['auc'] is not None and np.isfinite(r['auc']):
      roc(path(f'roc_{name}.png'), per_image['label'], per_image['melanoma_prob'], r['auc'],
          title)
    if 'melanoma_prob' in per_image:
      reliability(path(f'reliability_{name}.png'), per_image['label'],
                  per_image['melanoma_prob'], out.calibrated_prob, title)
    overlays(path(f'overlays_{name}.png'), out.split, per_image, predict_fn, threshold, title)
  write_json(path('metrics.json'), results)
  with workdir_lib.atomic_write(path('report.md')) as f:
    f.write(markdown(evaluation, experiment=experiment, arch=arch, threshold=threshold,
                     seg_error_dice=seg_error_dice))


def markdown(evaluation: Evaluation, *, experiment: str, arch: str, threshold: float,
             seg_error_dice: float) -> str:
  """report.md: the run's heading, the decision, then per set its rows (the ensemble's too),
  the calibration, the decisions at the operating point and the review flag."""
  results = evaluation.results
  calibration, decision = results['calibration'], results['decision']
  params = results.get('params', 0)
  sections = [f'# Results of {experiment}', '',
              f'Step {results.get("steps")}; {results.get("params")} parameters. Percentages. '
              'TPR = support-weighted recall (the paper\'s "TPR"), TNR = benign recall, '
              'F1 = support-weighted F1; MCC, IoU, DSC are per-image means.', '']
  if results.get('trained_on_test_images'):
    sections += ['**WARNING: trained with data.paper_protocol_train_on_test_images=True: the '
                 'training set contains evaluation images. These numbers are not a fair test.**',
                 '']
  if arch == 'resnet50':
    sections += ['ResNet-50 is trained from scratch (no pretrained weights can be downloaded '
                 'here); the paper does not say whether its baseline was pretrained.', '']
  sections.append(decision_section(decision, calibration))
  if evaluation.validation is not None:
    sections.append(review_section(
        'validation', evaluation.validation.review, decision, seg_error_dice=seg_error_dice,
        note='In-sample: the thresholds were fitted on these images. '))
  for name, out in evaluation.sets.items():
    r = results[name]
    sections.append(report_section(name, r, experiment, params, threshold=threshold))
    if 'ensemble' in r:
      sections.append(report_section(name, r['ensemble'], f'{experiment} ensemble of '
                                     f'{len(r["members"])}', params,
                                     paper_config=experiment, heading=False))
    target = r.get('ensemble', r)  # what the calibration and the decisions are of
    label = f'{experiment} ensemble' if 'ensemble' in r else experiment
    sections.append(calibration_section(target, calibration, label, threshold=threshold))
    if target.get('operating_point') is not None:
      sections.append(operating_point_section(target, label, threshold=threshold))
    sections.append(review_section(name, out.review, decision, seg_error_dice=seg_error_dice))
  return '\n'.join(sections)


def save_figure(fig, path: str, dpi: int) -> None:
  """Saves a matplotlib figure as PNG, whole or not at all, and closes it."""
  with workdir_lib.atomic_write(path, 'wb') as f:
    fig.savefig(f, format='png', dpi=dpi)
  _plt().close(fig)


# The uncertainty columns of per_image_<set>.csv (skinmtl_jax/uncertainty.py), where present.
UNCERTAINTY_COLUMNS = (uncertainty.MELANOMA_COLUMNS + uncertainty.MASK_COLUMNS + ('review',)
                       + tuple(f'review_{r}' for r in uncertainty.REASONS))


def write_per_image(path: str, per_image: dict[str, list]) -> None:
  keys = [k for k in ('id', 'label', 'melanoma_prob', 'dice', 'iou', 'mcc') if k in per_image]
  keys += [k for k in per_image if k.startswith(('melanoma_prob_member', 'dice_member'))]
  keys += [k for k in UNCERTAINTY_COLUMNS if k in per_image]
  with workdir_lib.atomic_write(path, newline='') as f:
    w = csv.writer(f)
    w.writerow(keys)
    w.writerows(zip(*(per_image[k] for k in keys)))


def write_json(path: str, obj: Any) -> None:
  """Writes JSON through a temporary file, so a crash never leaves half a file."""
  with workdir_lib.atomic_write(path) as f:
    json.dump(obj, f, indent=1)


def _plt():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def boxplot(path, per_image, title):
  plt = _plt()
  fig, ax = plt.subplots(figsize=(4.5, 4))
  data = [100 * np.asarray(per_image[k]) for k in ('mcc', 'iou', 'dice')]
  ax.boxplot(data, showmeans=True)
  ax.set_xticks([1, 2, 3], ['MCC', 'IoU', 'DSC'])
  ax.set_ylabel('per-image score (%)')
  ax.set_title(title)
  ax.grid(axis='y', alpha=0.3)
  fig.tight_layout()
  save_figure(fig, path, dpi=120)


def roc(path, labels, probs, auc, title):
  plt = _plt()
  order = np.argsort(-np.asarray(probs), kind='mergesort')
  y = np.asarray(labels)[order]
  tpr = np.r_[0, np.cumsum(y) / max(y.sum(), 1)]
  fpr = np.r_[0, np.cumsum(1 - y) / max((1 - y).sum(), 1)]
  fig, ax = plt.subplots(figsize=(4, 4))
  ax.plot(fpr, tpr, lw=2, label=f'AUC {auc:.3f}')
  ax.plot([0, 1], [0, 1], 'k--', lw=1)
  ax.set_xlabel('1 - specificity (benign called melanoma)')
  ax.set_ylabel('sensitivity (melanoma found)')
  ax.set_title(title)
  ax.legend(loc='lower right')
  fig.tight_layout()
  save_figure(fig, path, dpi=120)


def reliability(path, labels, probs, calibrated, title):
  """Reliability diagram: share of melanomas against the mean probability per bin (15 bins),
  before and (when fitted) after calibration, with the images per bin below."""
  plt = _plt()
  fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.2, 5.2), sharex=True,
                                 gridspec_kw={'height_ratios': [3, 1]})
  ax.plot([0, 1], [0, 1], 'k--', lw=1, label='perfectly calibrated')
  curves = [('model', probs, 'tab:red')]
  if calibrated is not None:
    curves.append(('calibrated', calibrated, 'tab:blue'))
  edges = np.linspace(0, 1, metrics.ECE_BINS + 1)
  for name, p, color in curves:
    r = metrics.reliability(labels, p)
    full = r['count'] > 0
    ece = metrics.expected_calibration_error(labels, p)
    ax.plot(r['mean_prob'][full], r['frequency'][full], 'o-', color=color,
            label=f'{name} (ECE {ece:.3f})')
    hist.hist(np.asarray(p), bins=edges, histtype='step', color=color)
  ax.set_ylabel('share of melanomas')
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_title(title)
  ax.legend(loc='upper left', fontsize=8)
  hist.set_xlabel('predicted melanoma probability')
  hist.set_ylabel('images')
  fig.tight_layout()
  save_figure(fig, path, dpi=120)


CURVES = (('losses', ('train/loss', 'train/dice_loss', 'train/cls_loss'), 'linear'),
          ('learning rate', ('train/learning_rate',), 'log'),
          ('gradient and update norms', ('train/l2_grads', 'train/l2_updates'), 'log'))


def write_curves(workdir: str) -> str | None:
  """`workdir/curves.png` from `workdir/scalars.jsonl`: the losses, the learning rate and the
  gradient (and update) norms over the steps; None when nothing was logged yet."""
  path = os.path.join(workdir, 'scalars.jsonl')
  if not os.path.exists(path):
    return None
  series: dict[str, dict[int, float]] = {}
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        row = json.loads(line)
        step = int(row.pop('step'))
      except (ValueError, KeyError, TypeError):
        continue  # a line cut off by a kill
      for k, v in row.items():
        series.setdefault(k, {})[step] = v  # a step logged again (resumed) keeps its last row
  panels = [(t, [k for k in keys if k in series], scale) for t, keys, scale in CURVES]
  panels = [p for p in panels if p[1]]
  if not panels:
    return None
  plt = _plt()
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
  for ax, (title, keys, scale) in zip(axes[0], panels):
    for k in keys:
      steps_, values = zip(*sorted(series[k].items()))
      ax.plot(steps_, values, label=k.split('/', 1)[-1])
    ax.set_yscale(scale)
    ax.set_xlabel('step')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  out = os.path.join(workdir, 'curves.png')
  save_figure(fig, out, dpi=110)
  return out


def figures(workdir: str) -> list[str]:
  """The run's figures (PNG files in its folder), for TensorBoard."""
  return sorted(glob.glob(os.path.join(workdir, '*.png')))


def overlays(path, split, per_image, predict_fn, threshold, title, k=4):
  """Best and worst k images by Dice (or by probability error for classification only)."""
  plt = _plt()
  if 'dice' in per_image:
    score = np.asarray(per_image['dice'])
  else:
    score = 1 - np.abs(np.asarray(per_image['melanoma_prob']) - np.asarray(per_image['label']))
  order = np.argsort(score, kind='mergesort')
  k = min(k, len(order) // 2) or 1
  chosen = list(order[::-1][:k]) + list(order[:k])
  examples = [split.source[int(i)] for i in chosen]
  out = predict_fn(np.stack([e['image'] for e in examples]))
  fig, axes = plt.subplots(2, k, figsize=(3 * k, 6.4), squeeze=False)
  for j, (ax, i, ex) in enumerate(zip(axes.ravel(), chosen, examples)):
    ax.imshow(ex['image'])
    ax.contour(ex['mask'], levels=[0.5], colors='white', linewidths=1.5)
    text = f'{ex["id"]}\n{"melanoma" if ex["label"] else "benign"}'
    if 'lesion_prob' in out:
      ax.contour(out['lesion_prob'][j] >= threshold, levels=[0.5], colors='deepskyblue',
                 linewidths=1.5)
      text += f'  DSC {100 * per_image["dice"][i]:.1f}'
    if 'melanoma_prob' in out:
      text += f'\nP(melanoma) {out["melanoma_prob"][j]:.2f}'
    ax.set_title(text, fontsize=8)
    ax.axis('off')
  axes[0, 0].text(-0.1, 0.5, 'best', transform=axes[0, 0].transAxes, rotation=90, va='center')
  axes[1, 0].text(-0.1, 0.5, 'worst', transform=axes[1, 0].transAxes, rotation=90, va='center')
  fig.suptitle(f'{title}: truth white, prediction blue')
  fig.tight_layout()
  save_figure(fig, path, dpi=110)


def pct(x):
  return '-' if x is None else f'{100 * x:.2f}' if isinstance(x, float) else str(x)


def confusion_cells(cm):
  if cm is None:
    return ('-', '-'), ('-', '-')
  rows = []
  for r in cm:
    total = sum(r) or 1
    rows.append(tuple(f'{v} ({100 * v / total:.2f}%)' for v in r))
  return rows[0], rows[1]


def report_section(eval_set: str, r: dict, experiment: str, num_params: int, *,
                   paper_config: str | None = None, heading: bool = True,
                   threshold: float = 0.5) -> str:
  """Markdown for one evaluation set: our row and the paper's in Table 3-4 layout, our
  decisions at `threshold` (said in the heading; the paper's are at 0.5).

  For a seed ensemble's entry (with 'std'), each number is the members' mean ± std."""
  std = r.get('std', {})

  def cell(key):
    v = r.get(key)
    if v is None:
      return '-'
    return f'{100 * v:.2f} ± {100 * std[key]:.2f}' if key in std else f'{100 * v:.2f}'

  lines = []
  if heading:
    at = (f'decisions at the threshold {threshold:g}' if threshold == 0.5 else
          f'our decisions at the threshold {threshold:g}, the paper\'s at 0.5')
    lines += [f'## {eval_set} ({r["n"]} images; {at})', '',
              '| ID | Param. [M] | truth | pred. B | pred. M | TPR | TNR | F1 | MCC | IoU | DSC |',
              '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  b, m = confusion_cells(r.get('confusion'))
  label = f'{experiment} (ours, mean ± std of {len(r["members"])} seeds)' if std else \
      f'{experiment} (ours)'
  lines.append(f'| {label} | {num_params / 1e6:.2f} | B | {b[0]} | {b[1]} | '
               + ' | '.join(cell(k) for k in ('tpr_weighted', 'tnr', 'f1_weighted', 'mcc', 'iou',
                                               'dice')) + ' |')
  lines.append(f'| | | M | {m[0]} | {m[1]} | | | | | | |')
  name = paper_config or experiment
  row = paper.paper_row(name, eval_set)
  if heading and row is not None:
    pb, pm = confusion_cells(row.confusion)
    fmt = lambda v: '-' if v is None else f'{v:.2f}'
    lines.append(f'| {name} (paper) | {row.params:.2f} | B | {pb[0]} | {pb[1]} | {fmt(row.tpr)} | '
                 f'{fmt(row.tnr)} | {fmt(row.f1)} | {fmt(row.mcc)} | {fmt(row.iou)} | '
                 f'{fmt(row.dsc)} |')
    lines.append(f'| | | M | {pm[0]} | {pm[1]} | | | | | | |')
  elif heading:
    lines.append(f'| (paper) | | | no row for {name} on {eval_set} | | | | | | | |')
  lines += ['', f'{label}: ' + ', '.join(
      f'{k} {cell(k)}' for k in ('auc', 'ap', 'recall_melanoma', 'recall_benign',
                                 'dice_pooled', 'iou_pooled', 'mcc_pooled')
      if r.get(k) is not None) + '.', '']
  if r.get('ci95'):
    lines += ['95 % bootstrap intervals over images: ' + ', '.join(
        f'{k} [{pct(lo)}, {pct(hi)}]' for k, (lo, hi) in r['ci95'].items()) + '.', '']
  return '\n'.join(lines)


def calibration_section(r: dict, calibration: dict[str, Any] | None, label: str, *,
                        threshold: float) -> str:
  """Markdown: ECE, Brier and the decisions at `threshold` of `r`'s melanoma probability, and
  beside them the same after calibration (r['calibrated'])."""
  if r.get('ece') is None:
    return ''
  cols = ('ece', 'brier', 'tpr_weighted', 'tnr', 'f1_weighted', 'recall_melanoma')

  def row(name, x):
    b, m = confusion_cells(x.get('confusion'))
    return (f'| {name} | ' + ' | '.join(f'{x[k]:.4f}' if k in ('ece', 'brier') else pct(x[k])
                                         for k in cols) + f' | {b[1]} | {m[1]} |')
  lines = [f'Calibration of {label}\'s melanoma probability (ECE over 15 bins, Brier score; '
           f'decisions at the threshold {threshold}):', '',
           '| probability | ECE | Brier | TPR | TNR | F1 | recall M | B called M | M called M |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- |', row('as trained (the rows above)', r)]
  if calibration is not None and r.get('calibrated'):
    lines.append(row(f'calibrated (T {calibration["temperature"]:.3f}, bias '
                     f'{calibration["bias"]:+.3f}; fitted on {calibration["n"]} validation '
                     'images)', r['calibrated']))
  else:
    lines.append('| calibrated | no calibration: data.validation_fraction is 0, or the '
                 'validation split lacks a class | | | | | | | |')
  return '\n'.join(lines + ['', ''])


# ------------------------------------------------ the decision and the review flag (uncertainty.py)

ERROR_NAMES = {'decision_wrong': 'decision wrong', 'dice_below': 'Dice < {dice:g}'}


def _reason_name(reason: str, decision: dict[str, Any] | None) -> str:
  review = (decision or {}).get('review') or {}
  if reason == 'decision_disagreement':
    return 'members disagree on the decision'
  if reason == 'mask_agreement':
    return f'mask agreement (members\' mean Dice) below {review["mask_dice_min"]:.3f}'
  if reason == 'near_threshold':
    lo, hi = review['near_threshold']
    return f'probability within the threshold\'s interval [{lo:.3f}, {hi:.3f}]'
  return {'lesion_at_border': 'lesion touches the border', 'lesion_empty': 'no lesion found'}[reason]


def decision_section(decision: dict[str, Any] | None, calibration: dict[str, Any] | None) -> str:
  """Markdown: the operating point and the review flag's thresholds, as fitted on the
  validation split (decision.json)."""
  lines = ['## The decision and the review flag', '']
  if decision is None:
    return '\n'.join(lines + ['No decision.json for this checkpoint (data.validation_fraction is '
                              '0, or it was not fitted): the decisions are at the run\'s '
                              'threshold and the review flag checks only what needs no '
                              'threshold.', '', ''])
  f = decision.get('fitted_on', {})
  lines += [f'Fitted on the validation split ({f.get("images")} images, {f.get("melanomas")} '
            f'melanomas; {f.get("members")} member(s), single views; decision.json):', '']
  op = decision.get('operating_point')
  if op is None:
    lines.append(f'- **Operating point**: none ({decision.get("operating_point_missing")}); '
                 '`predict` decides at the run\'s threshold.')
  else:
    lo, hi = op['threshold_ci95']
    cal = (f' ({op["threshold_calibrated"]:.3f} on the calibrated probability)'
           if op.get('threshold_calibrated') is not None else '')
    ci = lambda c: f'[{pct(c[0])}, {pct(c[1])}]' if c else '-'
    oob = op.get('sensitivity_out_of_bag')
    lines.append(
        f'- **Operating point** (the decision `predict` prints): melanoma sensitivity '
        f'{op["target_sensitivity"]:.2f} on the validation split, reached at the threshold '
        f'{op["threshold"]:.3f} on the melanoma probability{cal}; 95 % bootstrap interval of '
        f'the threshold over the validation images [{lo:.3f}, {hi:.3f}] '
        f'({op["bootstrap_samples"]} resamples). On the validation split, in-sample (the '
        f'threshold was chosen there): sensitivity {pct(op["sensitivity"])} % '
        f'{ci(op["sensitivity_ci95"])} ({op["melanomas"]} melanomas; Wilson 95 %), '
        f'specificity {pct(op["specificity"])} % {ci(op["specificity_ci95"])} '
        f'({op["benign"]} benign). Out of bag (chosen on each resample, measured on the '
        f'melanomas it left out): sensitivity '
        f'{"-" if oob is None else pct(oob) + " %"}, what to expect on new images.')
  review = decision.get('review') or {}
  parts = ['members disagreeing on the decision', 'a lesion touching the border',
           'no lesion found']
  if review.get('mask_dice_min') is not None:
    parts.insert(1, f'mask agreement (the members\' mean Dice) below '
                    f'{review["mask_dice_min"]:.3f}, the lowest '
                    f'{100 * decision.get("review_share", 0):g} % of the validation images')
  if review.get('near_threshold') is not None:
    lo, hi = review['near_threshold']
    parts.insert(2, f'a probability within the operating threshold\'s interval '
                    f'[{lo:.3f}, {hi:.3f}]')
  lines.append('- **Review flag**: ' + '; '.join(parts) + '.')
  if calibration is None and op is not None:
    lines.append('- No calibration: the threshold is on the probability as trained.')
  return '\n'.join(lines + ['', ''])


def operating_point_section(r: dict, label: str, *, threshold: float) -> str:
  """Markdown: sensitivity and specificity of `r`'s decisions at the run's threshold, after
  calibration, and at the operating point (r['operating_point'])."""
  op = r.get('operating_point')
  if op is None:
    return ''

  def row(name, t, sens, spec, cm, ci=None):
    ci = ci or {}
    cell = lambda v, k: pct(v) + (f' [{pct(ci[k][0])}, {pct(ci[k][1])}]' if k in ci else '')
    b, m = confusion_cells(cm)
    return f'| {name} | {t} | {cell(sens, "sensitivity")} | {cell(spec, "specificity")} | ' \
           f'{b[1]} | {m[1]} |'
  lines = [f'Decisions of {label} at the operating point, beside those at the threshold '
           f'{threshold:g} (sensitivity = melanoma recall, specificity = benign recall; 95 % '
           'bootstrap intervals over images):', '',
           '| decision | threshold | sensitivity | specificity | B called M | M called M |',
           '| --- | --- | --- | --- | --- | --- |',
           row('as trained (the rows above)', f'{threshold:g}', r.get('recall_melanoma'),
               r.get('recall_benign'), r.get('confusion'))]
  c = r.get('calibrated')
  if c:
    lines.append(row('calibrated', f'{threshold:g}', c.get('recall_melanoma'),
                     c.get('recall_benign'), c.get('confusion')))
  lines.append(row('**operating point**', f'{op["threshold"]:.3f}', op['sensitivity'],
                   op['specificity'], op['confusion'], op.get('ci95')))
  return '\n'.join(lines + ['', ''])


def review_section(eval_set: str, a: dict[str, Any], decision: dict[str, Any] | None, *,
                   seg_error_dice: float, note: str = '') -> str:
  """Markdown: the error rates among the images the review flag refers and the others, per
  reason, and the AUC of each uncertainty measure for finding an error (`a`:
  uncertainty.assess's result); `note` is said after the first sentence."""
  errs = [e for e in ('decision_wrong', 'dice_below') if a['all'].get(e) is not None]
  names = [ERROR_NAMES[e].format(dice=seg_error_dice) for e in errs]

  def row(name, x):
    cells = [f'{pct(x[e])} ({x[f"{e}_n"]})' if x[e] is not None else '-' for e in errs]
    return f'| {name} | {x["n"]} | {pct(x["share"])} | ' + ' | '.join(cells) + ' |'
  opinions = a.get('opinions') or 1
  at = ('the operating point' if (decision or {}).get('operating_point') else
        'the run\'s threshold')
  lines = [f'Review flag on {eval_set}: {a["all"]["n"]} images, {opinions} '
           f'opinion{"s" if opinions > 1 else ""} each, decisions at {at} '
           f'({a["threshold"]:.3f}). {note}An error: ' + ', '.join(names) +
           '. Percentages (counts):', '',
           '| images | n | share | ' + ' | '.join(names) + ' |',
           '| --- | --- | --- | ' + ' | '.join('---' for _ in names) + ' |',
           row('**flagged for review**', a['flagged']), row('not flagged', a['not_flagged']),
           row('all', a['all'])]
  lines += [row(f'reason: {_reason_name(k, decision)}', v) for k, v in a['by_reason'].items()]
  if a['unchecked']:
    lines += ['', 'Not checked: ' + '; '.join(f'{k.replace("_", " ")} ({why})'
                                              for k, why in a['unchecked'].items()) + '.']
  lines += ['', 'ROC AUC of each measure for finding an error (0.5: chance; -: no error of that '
            'kind, or none correct):', '', '| measure | ' + ' | '.join(names) + ' |',
            '| --- | ' + ' | '.join('---' for _ in names) + ' |']
  for k, label in uncertainty.SCORES:
    if k in a['auc']:
      cells = ['-' if a['auc'][k][e] is None else f'{a["auc"][k][e]:.3f}' for e in errs]
      lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines + ['', f'Referral curves: referral_{eval_set}.png.', '', ''])


# Which measures each referral panel draws.
_REFERRAL = {'decision_wrong': ('near_threshold', 'mutual_information', 'melanoma_prob_std',
                                'melanoma_prob_range', 'votes_against'),
             'dice_below': ('mask_dice_between', 'mask_disagreement')}


def referral(path: str, a: dict[str, Any], title: str, *, seg_error_dice: float) -> bool:
  """Referral curves (uncertainty.referral_curve): the error rate of the images kept against
  the share referred for review, most uncertain first, per measure and kind of error; the
  review flag as a star; referring at random keeps the overall rate (dashed). False (nothing
  written) when the set has no kind of error to show."""
  errors, sc = a['per_image']['errors'], a['per_image']['scores']
  panels = [e for e in ('decision_wrong', 'dice_below') if e in errors]
  if not panels or not len(next(iter(errors.values()))):
    return False
  plt = _plt()
  fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4.2), squeeze=False)
  names = dict(uncertainty.SCORES)
  for ax, e in zip(axes[0], panels):
    err = np.asarray(errors[e], np.float64)
    for k in _REFERRAL[e]:
      if k in sc:
        x, y = uncertainty.referral_curve(sc[k], err)
        ax.plot(100 * x, 100 * y, lw=1.5, label=names[k])
    ax.axhline(100 * err.mean(), color='k', ls='--', lw=1, label='referred at random')
    kept = a['not_flagged'][e]
    if kept is not None:
      ax.plot(100 * a['flagged']['share'], 100 * kept, 'k*', ms=11, label='the review flag')
    ax.set_xlabel('images referred for review (%)')
    ax.set_ylabel(f'{ERROR_NAMES[e].format(dice=seg_error_dice)}: % of the images kept')
    ax.set_xlim(0, 100)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  save_figure(fig, path, dpi=110)
  return True
