"""What an evaluation leaves for people: report.md's sections (our rows in the layout of the
paper's Tables 3-4 beside the paper's, and the calibration), per_image_<set>.csv, metrics.json,
and the figures: boxplot_<set>.png, roc_<set>.png, reliability_<set>.png, overlays_<set>.png and
curves.png (training curves from scalars.jsonl). Every file is written whole or not at all
(workdir.atomic_write). The measures themselves come from skinmtl_jax/evaluate.py.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from typing import Any

import numpy as np

from skinmtl_jax import metrics, paper
from skinmtl_jax import workdir as workdir_lib


def save_figure(fig, path: str, dpi: int) -> None:
  """Saves a matplotlib figure as PNG, whole or not at all, and closes it."""
  with workdir_lib.atomic_write(path, 'wb') as f:
    fig.savefig(f, format='png', dpi=dpi)
  _plt().close(fig)


def write_per_image(path: str, per_image: dict[str, list]) -> None:
  keys = [k for k in ('id', 'label', 'melanoma_prob', 'dice', 'iou', 'mcc') if k in per_image]
  keys += [k for k in per_image if k.startswith(('melanoma_prob_member', 'dice_member'))]
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
