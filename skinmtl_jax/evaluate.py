"""Evaluation: measures, `metrics.json`, `report.md`, per-image CSVs and figures.

    python -m skinmtl_jax.evaluate --workdir=RUN [--datasets=isic2016_test,ph2]

evaluates the latest checkpoint of RUN (also run at the end of training) and writes into RUN:
metrics.json; report.md (our rows in the layout of the paper's Tables 3-4, the paper's row
beside them, and the calibration of the melanoma probability); per_image_<set>.csv;
boxplot_<set>.png (per-image MCC, IoU, DSC, the paper's Figure 6); overlays_<set>.png (best and
worst cases, the paper's Figures 5 and 7); roc_<set>.png; reliability_<set>.png (the
reliability diagram before and after calibration); calibration.json (the temperature and bias
fitted on the validation split, see skinmtl_jax/calibration.py); and the figures as images in
the run's TensorBoard files.
"""

from __future__ import annotations

import csv
import functools
import glob
import json
import os
import sys
import time
from typing import Any

from absl import flags, logging
import jax
import ml_collections
import numpy as np

from skinmtl_jax import calibration as calibration_lib
from skinmtl_jax import workdir as workdir_lib
from skinmtl_jax import checkpointing, input_pipeline, metrics, paper, steps, writers
from skinmtl_jax.config_base import ConfigError
from skinmtl_jax.datasets.files import DataError

SEG_KEYS = ('dice', 'iou', 'mcc')
CLS_KEYS = ('f1_weighted', 'tpr_weighted', 'tnr', 'auc', 'ap', 'confusion')
CI_KEYS = ('dice', 'iou', 'mcc', 'f1_weighted', 'tpr_weighted', 'tnr', 'auc')


HEADLINE = ('dice', 'iou', 'mcc', 'dice_pooled', 'iou_pooled', 'mcc_pooled', 'f1_weighted',
            'tpr_weighted', 'tnr', 'recall_melanoma', 'recall_benign', 'auc', 'ap', 'ece',
            'brier')
# What calibration changes: its own measures and the decisions at the threshold.
CALIBRATED_KEYS = ('ece', 'brier', 'tpr_weighted', 'tnr', 'f1_weighted', 'recall_melanoma',
                   'recall_benign', 'confusion')


def scores(labels: np.ndarray, counts: np.ndarray | None, probs: np.ndarray | None, *,
           threshold: float, bootstrap_samples: int = 1000) -> tuple[dict, dict]:
  """Measures of one model on one set, from per-image seg counts (N, 4) and melanoma
  probabilities (N,) (either may be None). Returns (result, per_image)."""
  result: dict[str, Any] = {k: None for k in SEG_KEYS + CLS_KEYS}
  per_image: dict[str, Any] = {'label': labels.tolist()}
  stats = {}
  if counts is not None:
    seg = metrics.segmentation_scores(counts)
    per = seg.pop('per_image')
    per_image.update({k: v.tolist() for k, v in per.items()})
    result.update(seg)
    stats.update({k: functools.partial(lambda a, idx: float(np.mean(a[idx])), per[k])
                  for k in SEG_KEYS})
  if probs is not None:
    p = np.asarray(probs, np.float64)
    result.update(metrics.classification_scores(labels, p, threshold))
    result['ap'] = metrics.average_precision(labels, p)
    result['ece'] = metrics.expected_calibration_error(labels, p)
    result['brier'] = metrics.brier_score(labels, p)
    per_image['melanoma_prob'] = p.tolist()

    def cls_stat(key, idx):
      if key == 'auc':
        return metrics.roc_auc(labels[idx], p[idx])
      cm = metrics.confusion_matrix(labels[idx], (p[idx] >= threshold).astype(int))
      return metrics.classification_scores_from_confusion(cm)[key]
    stats.update({k: functools.partial(cls_stat, k) for k in ('f1_weighted', 'tpr_weighted',
                                                              'tnr', 'auc')})
  if bootstrap_samples:
    result['ci95'] = {k: list(metrics.bootstrap_ci(stats[k], len(labels),
                                                   num_samples=bootstrap_samples))
                      for k in CI_KEYS if k in stats}
  result['n'] = len(labels)
  return result, per_image


def aggregate_members(members: list[dict]) -> dict[str, Any]:
  """Mean, standard deviation (ddof 1) and the 95 % t-interval of the mean across members, for
  every headline number; the mean confusion matrix. Keys of the mean stay at the top level."""
  from scipy import stats as sps  # pylint: disable=import-outside-toplevel
  k = len(members)
  out: dict[str, Any] = {'std': {}, 'ci95_across_members': {}}
  for key in HEADLINE:
    vals = [m[key] for m in members if m.get(key) is not None]
    if len(vals) != k:
      out[key] = None
      continue
    v = np.asarray(vals, np.float64)
    mean, std = float(v.mean()), float(v.std(ddof=1)) if k > 1 else 0.0
    half = float(sps.t.ppf(0.975, k - 1) * std / np.sqrt(k)) if k > 1 else 0.0
    out[key] = mean
    out['std'][key] = std
    out['ci95_across_members'][key] = [mean - half, mean + half]
  cms = [m['confusion'] for m in members if m.get('confusion') is not None]
  out['confusion'] = np.mean(cms, axis=0).tolist() if len(cms) == k else None
  return out


def evaluate_split(eval_step, state, split: input_pipeline.Split, *, batch_size: int,
                   threshold: float, bootstrap_samples: int = 1000) -> dict[str, Any]:
  """Runs the jitted `eval_step` over every example of `split` once.

  With one member, returns its measures ('ci95' by bootstrap over images). With K > 1, the
  top-level measures are the members' means, with 'std', 'ci95_across_members', 'members'
  (each member's measures) and 'ensemble' (the measures of the members' averaged
  probabilities). 'per_image' (of the single model or the ensemble) is for the report.
  """
  outs, ids = [], []
  total, t0 = len(split.source), time.time()
  last_log = t0
  for batch, batch_ids in input_pipeline.eval_batches(split, batch_size):
    valid = batch.pop('valid')
    out = jax.device_get(eval_step(state, batch))
    outs.append({k: (v[:, valid] if not k.startswith('ensemble') else v[valid])
                 for k, v in out.items()})
    ids += batch_ids
    if time.time() - last_log > 10 and len(ids) < total:
      last_log = time.time()
      logging.info('Evaluating %s: %d/%d images, %.1f images/s.', split.name, len(ids), total,
                   len(ids) / (last_log - t0))
  seconds = time.time() - t0
  logging.info('Evaluated %s: %d images in %.1f s, %.1f images/s.', split.name, len(ids),
               seconds, len(ids) / max(seconds, 1e-9))
  cat = {k: np.concatenate([o[k] for o in outs], axis=0 if k.startswith('ensemble') else 1)
         for k in outs[0]}
  labels = np.asarray(split.labels)
  num = (cat.get('seg_counts') if 'seg_counts' in cat else cat['melanoma_prob']).shape[0]
  member_arrays = lambda i: (cat['seg_counts'][i] if 'seg_counts' in cat else None,
                             cat['melanoma_prob'][i] if 'melanoma_prob' in cat else None)
  if num == 1:
    result, per_image = scores(labels, *member_arrays(0), threshold=threshold,
                               bootstrap_samples=bootstrap_samples)
  else:
    members = [scores(labels, *member_arrays(i), threshold=threshold, bootstrap_samples=0)[0]
               for i in range(num)]
    ensemble, per_image = scores(labels, cat.get('ensemble_seg_counts'),
                                 cat.get('ensemble_melanoma_prob'), threshold=threshold,
                                 bootstrap_samples=bootstrap_samples)
    result = {**aggregate_members(members), 'n': len(ids), 'members': members,
              'ensemble': ensemble}
    if 'melanoma_prob' in cat:  # each member's probabilities too: paired comparisons of seeds
      per_image.update({f'melanoma_prob_member{i}': cat['melanoma_prob'][i].tolist()
                        for i in range(num)})
  per_image['id'] = ids
  result['per_image'] = per_image
  return result


def calibrated_scores(labels, probs, calibration: dict[str, Any], *,
                      threshold: float) -> dict[str, Any]:
  """ECE, Brier and the decision measures at `threshold` of the calibrated probabilities."""
  labels = np.asarray(labels)
  q = calibration_lib.apply(probs, calibration)
  out = {k: v for k, v in metrics.classification_scores(labels, q, threshold).items()
         if k in CALIBRATED_KEYS}
  out['ece'] = metrics.expected_calibration_error(labels, q)
  out['brier'] = metrics.brier_score(labels, q)
  return out


def fit_calibration(eval_step, state, validation: input_pipeline.Split, *,
                    batch_size: int) -> dict[str, Any] | None:
  """Platt scaling of the melanoma probability (of the single model, or the ensemble's
  average, what `predict` gives) on the validation split; None without a classifier."""
  r = evaluate_split(eval_step, state, validation, batch_size=batch_size, threshold=0.5,
                     bootstrap_samples=0)
  probs = r['per_image'].get('melanoma_prob')
  if probs is None:
    return None
  fitted = calibration_lib.fit(validation.labels, probs)
  if fitted is not None:
    logging.info('Calibration on %s (%d images, %d melanomas): temperature %.3f, bias %.3f; '
                 'NLL %.4f -> %.4f.', validation.name, fitted['n'], fitted['melanomas'],
                 fitted['temperature'], fitted['bias'], fitted['nll_before'],
                 fitted['nll_after'])
  return fitted


# ----------------------------------------------------------------------------- artifacts

def _write_per_image(path: str, per_image: dict[str, list]) -> None:
  keys = [k for k in ('id', 'label', 'melanoma_prob', 'dice', 'iou', 'mcc') if k in per_image]
  keys += [k for k in per_image if k.startswith('melanoma_prob_member')]
  tmp = path + '.tmp'
  with open(tmp, 'w', newline='', encoding='utf-8') as f:
    w = csv.writer(f)
    w.writerow(keys)
    w.writerows(zip(*(per_image[k] for k in keys)))
  os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
  """Writes JSON through a temporary file, so a crash never leaves half a file."""
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _plt():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _boxplot(path, per_image, title):
  plt = _plt()
  fig, ax = plt.subplots(figsize=(4.5, 4))
  data = [100 * np.asarray(per_image[k]) for k in ('mcc', 'iou', 'dice')]
  ax.boxplot(data, showmeans=True)
  ax.set_xticks([1, 2, 3], ['MCC', 'IoU', 'DSC'])
  ax.set_ylabel('per-image score (%)')
  ax.set_title(title)
  ax.grid(axis='y', alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _roc(path, labels, probs, auc, title):
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
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _reliability(path, labels, probs, calibrated, title):
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
  fig.savefig(path, dpi=120)
  plt.close(fig)


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
  fig.savefig(out + '.tmp.png', dpi=110)
  plt.close(fig)
  os.replace(out + '.tmp.png', out)
  return out


def figures(workdir: str) -> list[str]:
  """The run's figures (PNG files in its folder), for TensorBoard."""
  return sorted(glob.glob(os.path.join(workdir, '*.png')))


def _overlays(path, split, per_image, predict_fn, threshold, title, k=4):
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
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _pct(x):
  return '-' if x is None else f'{100 * x:.2f}' if isinstance(x, float) else str(x)


def _confusion_cells(cm):
  if cm is None:
    return ('-', '-'), ('-', '-')
  rows = []
  for r in cm:
    total = sum(r) or 1
    rows.append(tuple(f'{v} ({100 * v / total:.2f}%)' for v in r))
  return rows[0], rows[1]


def report_section(eval_set: str, r: dict, experiment: str, num_params: int, *,
                   paper_config: str | None = None, heading: bool = True) -> str:
  """Markdown for one evaluation set: our row and the paper's in Table 3-4 layout.

  For a seed ensemble's entry (with 'std'), each number is the members' mean ± std."""
  std = r.get('std', {})

  def cell(key):
    v = r.get(key)
    if v is None:
      return '-'
    return f'{100 * v:.2f} ± {100 * std[key]:.2f}' if key in std else f'{100 * v:.2f}'

  lines = []
  if heading:
    lines += [f'## {eval_set} ({r["n"]} images)', '',
              '| ID | Param. [M] | truth | pred. B | pred. M | TPR | TNR | F1 | MCC | IoU | DSC |',
              '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  b, m = _confusion_cells(r.get('confusion'))
  label = f'{experiment} (ours, mean ± std of {len(r["members"])} seeds)' if std else \
      f'{experiment} (ours)'
  lines.append(f'| {label} | {num_params / 1e6:.2f} | B | {b[0]} | {b[1]} | '
               + ' | '.join(cell(k) for k in ('tpr_weighted', 'tnr', 'f1_weighted', 'mcc', 'iou',
                                               'dice')) + ' |')
  lines.append(f'| | | M | {m[0]} | {m[1]} | | | | | | |')
  name = paper_config or experiment
  row = paper.paper_row(name, eval_set)
  if heading and row is not None:
    pb, pm = _confusion_cells(row.confusion)
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
        f'{k} [{_pct(lo)}, {_pct(hi)}]' for k, (lo, hi) in r['ci95'].items()) + '.', '']
  return '\n'.join(lines)


def calibration_section(r: dict, calibration: dict[str, Any] | None, label: str, *,
                        threshold: float) -> str:
  """Markdown: ECE, Brier and the decisions at `threshold` of `r`'s melanoma probability, and
  beside them the same after calibration (r['calibrated'])."""
  if r.get('ece') is None:
    return ''
  cols = ('ece', 'brier', 'tpr_weighted', 'tnr', 'f1_weighted', 'recall_melanoma')

  def row(name, x):
    b, m = _confusion_cells(x.get('confusion'))
    return (f'| {name} | ' + ' | '.join(f'{x[k]:.4f}' if k in ('ece', 'brier') else _pct(x[k])
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


def evaluate_and_report(config: ml_collections.ConfigDict, state, model, workdir: str,
                        splits: dict[str, input_pipeline.Split],
                        results: dict[str, Any], write: bool = True,
                        validation: input_pipeline.Split | None = None) -> dict[str, Any]:
  """Evaluates `state` on each split (by eval set name) and writes every artifact into `workdir`.

  `results` holds what is known already (params, steps, data provenance); the evaluation
  entries are added to it and the whole is written as metrics.json. With a `validation` split,
  the calibration of the melanoma probability is fitted on it first ('calibration' in
  metrics.json, calibration.json; without one, the calibration.json fitted earlier for this
  checkpoint, if any, is used) and each set's entry (the ensemble's, for K > 1) gets
  'calibrated': the same measures of the calibrated probabilities. With `write=False`
  (processes other than the first of a multi-host run) nothing is written.
  """
  eval_step = jax.jit(functools.partial(steps.eval_step, model=model, threshold=config.threshold))
  step = checkpointing.step_of(state)
  if validation is not None and len(validation.source):
    calibration = fit_calibration(eval_step, state, validation,
                                  batch_size=config.eval_batch_size)
    if write:
      calibration_lib.save(workdir, calibration, step)
  else:
    calibration = calibration_lib.load(workdir, step)  # fitted earlier for this step, if at all
  results['calibration'] = calibration
  predict_jit = jax.jit(functools.partial(steps.ensemble_predictions, model=model))
  predict_fn = lambda images: jax.device_get(predict_jit(state, images))
  sections = [f'# Results of {config.experiment}', '',
              f'Step {results.get("steps")}; {results.get("params")} parameters. Percentages. '
              'TPR = support-weighted recall (the paper\'s "TPR"), TNR = benign recall, '
              'F1 = support-weighted F1; MCC, IoU, DSC are per-image means.', '']
  if results.get('trained_on_test_images'):
    sections += ['**WARNING: trained with data.paper_protocol_train_on_test_images=True: the '
                 'training set contains evaluation images. These numbers are not a fair test.**',
                 '']
  if config.model.arch == 'resnet50':
    sections += ['ResNet-50 is trained from scratch (no pretrained weights can be downloaded '
                 'here); the paper does not say whether its baseline was pretrained.', '']
  for name, split in splits.items():
    r = evaluate_split(eval_step, state, split, batch_size=config.eval_batch_size,
                       threshold=config.threshold)
    per_image = r.pop('per_image')
    results[name] = r
    # The calibration is of what predict gives: the single model, or the ensemble's average.
    target = r.get('ensemble', r)
    calibrated = None
    if calibration is not None and 'melanoma_prob' in per_image:
      calibrated = calibration_lib.apply(per_image['melanoma_prob'], calibration)
      target['calibrated'] = calibrated_scores(split.labels, per_image['melanoma_prob'],
                                               calibration, threshold=config.threshold)
    sections.append(report_section(name, r, config.experiment, results.get('params', 0)))
    if 'ensemble' in r:
      sections.append(report_section(name, r['ensemble'], f'{config.experiment} ensemble of '
                                     f'{len(r["members"])}', results.get('params', 0),
                                     paper_config=config.experiment, heading=False))
    sections.append(calibration_section(
        target, calibration, f'{config.experiment} ensemble' if 'ensemble' in r else
        config.experiment, threshold=config.threshold))
    if not write:
      continue
    _write_per_image(os.path.join(workdir, f'per_image_{name}.csv'), per_image)
    if r['dice'] is not None:
      _boxplot(os.path.join(workdir, f'boxplot_{name}.png'), per_image, f'{config.experiment}: {name}')
    if r['auc'] is not None and np.isfinite(r['auc']):
      _roc(os.path.join(workdir, f'roc_{name}.png'), per_image['label'],
           per_image['melanoma_prob'], r['auc'], f'{config.experiment}: {name}')
    if 'melanoma_prob' in per_image:
      _reliability(os.path.join(workdir, f'reliability_{name}.png'), per_image['label'],
                   per_image['melanoma_prob'], calibrated, f'{config.experiment}: {name}')
    _overlays(os.path.join(workdir, f'overlays_{name}.png'), split, per_image, predict_fn,
              config.threshold, f'{config.experiment}: {name}')
  if not write:
    return results
  write_json(os.path.join(workdir, 'metrics.json'), results)
  tmp = os.path.join(workdir, 'report.md.tmp')
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write('\n'.join(sections))
  os.replace(tmp, os.path.join(workdir, 'report.md'))
  return results


# ---------------------------------------------------------------------------- command line

def main(argv):
  del argv
  checkpointing.quiet_orbax_logging()
  try:
    checkpointing.check_run_dir(flags.FLAGS.workdir)
    # metrics.json and the report are the run's: not while it trains or is evaluated elsewhere.
    with workdir_lib.lock(flags.FLAGS.workdir):
      _evaluate(flags.FLAGS)
  except (checkpointing.CheckpointError, ConfigError, DataError) as e:
    sys.exit(f'skinmtl_jax.evaluate: {e}')


def _evaluate(f):
  config, model, state = checkpointing.load_run(f.workdir)
  names = f.datasets or list(config.data.eval_sets)
  splits = {n: input_pipeline.get_split(config.data, n) for n in names}
  try:
    validation = input_pipeline.validation_split(config.data)
  except (ConfigError, DataError) as e:  # e.g. evaluated where only the test sets are
    logging.warning('The validation split cannot be read (%s): the calibration is not fitted '
                    'again; the calibration.json of this checkpoint, if any, is used.', e)
    validation = None
  path = os.path.join(f.workdir, 'metrics.json')
  results = {}
  if os.path.exists(path):
    with open(path, encoding='utf-8') as fh:
      results = json.load(fh)
  results.update({'params': steps.num_params(state), 'steps': checkpointing.step_of(state)})
  results = evaluate_and_report(config, state, model, f.workdir, splits, results,
                                validation=validation)
  tensorboard = writers.TensorboardWriter(f.workdir)
  writers.write_figures(tensorboard, results['steps'], figures(f.workdir))
  tensorboard.close()
  for n in names:
    print(n, {k: v for k, v in results[n].items()
              if k not in ('ci95', 'confusion', 'calibrated', 'members')})


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('workdir', None, 'The training run to evaluate.')
  flags.DEFINE_list('datasets', [], 'Evaluation sets (default: the config\'s data.eval_sets).')
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
