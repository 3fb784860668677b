"""Evaluation: measures, `metrics.json`, `report.md`, per-image CSVs and figures.

    python -m skinmtl_jax.evaluate --workdir=RUN [--datasets=isic2016_test,ph2]

evaluates the latest checkpoint of RUN (also run at the end of training) and writes into RUN:
metrics.json; report.md (our rows in the layout of the paper's Tables 3-4, the paper's row
beside them); per_image_<set>.csv; boxplot_<set>.png (per-image MCC, IoU, DSC, the paper's
Figure 6); overlays_<set>.png (best and worst cases, the paper's Figures 5 and 7); roc_<set>.png.
"""

from __future__ import annotations

import csv
import functools
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from skinmtl_jax import input_pipeline, metrics, paper, steps

SEG_KEYS = ('dice', 'iou', 'mcc')
CLS_KEYS = ('f1_weighted', 'tpr_weighted', 'tnr', 'auc', 'ap', 'confusion')
CI_KEYS = ('dice', 'iou', 'mcc', 'f1_weighted', 'tpr_weighted', 'tnr', 'auc')


def evaluate_split(eval_step, state, split: input_pipeline.Split, *, batch_size: int,
                   threshold: float, bootstrap_samples: int = 1000) -> dict[str, Any]:
  """Runs the jitted `eval_step` over every example of `split` once.

  Returns the metrics.json entry: segmentation and classification measures (None for a task
  the model does not have), 'ci95' (bootstrap over images), 'n', and 'per_image' (ids, labels,
  probabilities, scores) for the report.
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
  labels = np.asarray(split.labels)
  result: dict[str, Any] = {k: None for k in SEG_KEYS + CLS_KEYS}
  per_image: dict[str, Any] = {'id': ids, 'label': labels.tolist()}
  stats = {}
  if counts:
    seg = metrics.segmentation_scores(np.concatenate(counts))
    per = seg.pop('per_image')
    per_image.update({k: v.tolist() for k, v in per.items()})
    result.update(seg)
    stats.update({k: functools.partial(lambda a, idx: float(np.mean(a[idx])), per[k])
                  for k in SEG_KEYS})
  if probs:
    p = np.concatenate(probs).astype(np.float64)
    result.update(metrics.classification_scores(labels, p, threshold))
    result['ap'] = metrics.average_precision(labels, p)
    per_image['melanoma_prob'] = p.tolist()

    def cls_stat(key, idx):
      if key == 'auc':
        return metrics.roc_auc(labels[idx], p[idx])
      cm = metrics.confusion_matrix(labels[idx], (p[idx] >= threshold).astype(int))
      return metrics.classification_scores_from_confusion(cm)[key]
    stats.update({k: functools.partial(cls_stat, k) for k in ('f1_weighted', 'tpr_weighted',
                                                              'tnr', 'auc')})
  result['ci95'] = {k: list(metrics.bootstrap_ci(stats[k], len(ids),
                                                 num_samples=bootstrap_samples))
                    for k in CI_KEYS if k in stats}
  result['n'] = len(ids)
  result['per_image'] = per_image
  return result


# ----------------------------------------------------------------------------- artifacts

def _write_per_image(path: str, per_image: dict[str, list]) -> None:
  keys = [k for k in ('id', 'label', 'melanoma_prob', 'dice', 'iou', 'mcc') if k in per_image]
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


def report_section(eval_set: str, r: dict, experiment: str, num_params: int) -> str:
  """Markdown for one evaluation set: our row and the paper's in Table 3-4 layout."""
  lines = [f'## {eval_set} ({r["n"]} images)', '',
           '| ID | Param. [M] | truth | pred. B | pred. M | TPR | TNR | F1 | MCC | IoU | DSC |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  b, m = _confusion_cells(r.get('confusion'))
  lines.append(f'| {experiment} (ours) | {num_params / 1e6:.2f} | B | {b[0]} | {b[1]} | '
               f'{_pct(r["tpr_weighted"])} | {_pct(r["tnr"])} | {_pct(r["f1_weighted"])} | '
               f'{_pct(r["mcc"])} | {_pct(r["iou"])} | {_pct(r["dice"])} |')
  lines.append(f'| | | M | {m[0]} | {m[1]} | | | | | | |')
  row = paper.paper_row(experiment, eval_set)
  if row is not None:
    params, cm, tpr, tnr, f1, mcc, iou, dsc = row
    pb, pm = _confusion_cells(cm)
    fmt = lambda v: '-' if v is None else f'{v:.2f}'
    lines.append(f'| {experiment} (paper) | {params:.2f} | B | {pb[0]} | {pb[1]} | {fmt(tpr)} | '
                 f'{fmt(tnr)} | {fmt(f1)} | {fmt(mcc)} | {fmt(iou)} | {fmt(dsc)} |')
    lines.append(f'| | | M | {pm[0]} | {pm[1]} | | | | | | |')
  else:
    lines.append(f'| (paper) | | | no row for {experiment} on {eval_set} | | | | | | | |')
  lines += ['', 'Also: ' + ', '.join(
      f'{k} {_pct(r.get(k))}' for k in ('auc', 'ap', 'recall_melanoma', 'recall_benign',
                                        'dice_pooled', 'iou_pooled', 'mcc_pooled')
      if r.get(k) is not None) + '.', '',
            '95 % bootstrap intervals over images: ' + ', '.join(
                f'{k} [{_pct(lo)}, {_pct(hi)}]' for k, (lo, hi) in r.get('ci95', {}).items()) + '.',
            '']
  return '\n'.join(lines)


def evaluate_and_report(config: ml_collections.ConfigDict, state, model, workdir: str,
                        splits: dict[str, input_pipeline.Split],
                        results: dict[str, Any]) -> dict[str, Any]:
  """Evaluates `state` on each split (by eval set name) and writes every artifact into `workdir`.

  `results` holds what is known already (params, steps, data provenance); the evaluation
  entries are added to it and the whole is written as metrics.json.
  """
  eval_step = jax.jit(functools.partial(steps.eval_step, model=model, threshold=config.threshold))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  predict_jit = jax.jit(functools.partial(steps.predict, model=model))
  predict_fn = lambda images: jax.device_get(predict_jit(variables, images))
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
    _write_per_image(os.path.join(workdir, f'per_image_{name}.csv'), per_image)
    if r['dice'] is not None:
      _boxplot(os.path.join(workdir, f'boxplot_{name}.png'), per_image, f'{config.experiment}: {name}')
    if r['auc'] is not None and np.isfinite(r['auc']):
      _roc(os.path.join(workdir, f'roc_{name}.png'), per_image['label'],
           per_image['melanoma_prob'], r['auc'], f'{config.experiment}: {name}')
    _overlays(os.path.join(workdir, f'overlays_{name}.png'), split, per_image, predict_fn,
              config.threshold, f'{config.experiment}: {name}')
    results[name] = r
    sections.append(report_section(name, r, config.experiment, results.get('params', 0)))
  write_json(os.path.join(workdir, 'metrics.json'), results)
  tmp = os.path.join(workdir, 'report.md.tmp')
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write('\n'.join(sections))
  os.replace(tmp, os.path.join(workdir, 'report.md'))
  return results


# ---------------------------------------------------------------------------- command line

def load_run(workdir: str, step: int | None = None):
  """(config, model, state) of the run in `workdir`, at its latest (or `step`'s) checkpoint."""
  from skinmtl_jax import checkpointing, models, train  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir} the --workdir of a training run?')
  with open(path, encoding='utf-8') as f:
    config = ml_collections.ConfigDict(json.load(f))
  model = models.create_model(config.model)
  template = steps.create_train_state(model, train.create_optimizer(config, 1),
                                      jax.random.key(0), tuple(config.data.image_size))
  manager = checkpointing.create_manager(workdir, read_only=True)
  try:
    state = checkpointing.restore(manager, template, step=step)
  finally:
    manager.close()
  return config, model, state


def main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  config, model, state = load_run(f.workdir)
  names = f.datasets or list(config.data.eval_sets)
  splits = {n: input_pipeline.get_split(config.data, n) for n in names}
  path = os.path.join(f.workdir, 'metrics.json')
  results = {}
  if os.path.exists(path):
    with open(path, encoding='utf-8') as fh:
      results = json.load(fh)
  results.update({'params': int(sum(np.size(x) for x in jax.tree.leaves(state.params))),
                  'steps': int(state.step)})
  results = evaluate_and_report(config, state, model, f.workdir, splits, results)
  for n in names:
    print(n, {k: v for k, v in results[n].items() if k not in ('ci95', 'confusion')})


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('workdir', None, 'The training run to evaluate.')
  flags.DEFINE_list('datasets', [], 'Evaluation sets (default: the config\'s data.eval_sets).')
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
