"""The controlled real-data study (docs/real_data_study.md): arms trained to one budget, each
with its seeds, compared with paired tests over the test images and tests across seeds.

    python -m skinmtl_jax.study DOCS_DIR [--page=PAGE.md]

reads DOCS_DIR as launch/real_data_study.sh leaves it (pilot/... and arms/<config>-study/
seed<N>[/<override>]/: metrics.json, per_image_<set>.csv with each member's probability and Dice,
per_image_validation.csv, validation_curve.jsonl), writes its tables into DOCS_DIR (study_*.md)
and the learning curves into docs/figures/, and with --page fills PAGE.md's
`<!-- table NAME -->` blocks (tables.fill_page).

What is measured, per seed (a member of a run's seed ensemble), on ISIC 2016 test:
- DSC (per-image mean), AUC, AP; the decisions at 0.5 (the paper's) as melanoma recall (TPR),
  benign recall (TNR) and balanced accuracy (BA, their mean), and the same at the threshold
  chosen on that seed's validation split (the one that maximises Youden's J = TPR + TNR - 1
  there; the validation split holds 14 melanomas, so the choice is itself noisy);
- the melanoma probability's calibration: ECE (15 bins, of the melanoma probability: class 1,
  not Guo et al.'s top-label ECE), Brier, and the Brier skill score against the constant that
  always answers the validation split's melanoma share (BSS > 0: better than that constant).

An arm pools the seeds of all its runs (seed0/ holds members 0-2, seed3/ members 3-5, ...).
Each comparison of two arms is the difference of their seed means, with
- a 95 % paired bootstrap interval over the test images (the same resampled images for both
  arms and every seed) and its two-sided bootstrap p-value;
- Welch's t-test across seeds (what varies between trainings), and the seeds per arm a
  two-sample t-test would need to detect the observed difference with 80 % power at 5 %;
- for AUC, DeLong's test on the two arms' ensemble probabilities (the mean over seeds).

A seed whose classifier collapsed (one constant melanoma probability for every validation
image: a training failure seen without the test set) stays in every table; the leak's and the
budget's comparisons are repeated without such seeds as a sensitivity analysis, beside, never
instead of, the comparisons over all seeds.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
from typing import Callable

import numpy as np

from skinmtl_jax import metrics, tables

EVAL_SET = 'isic2016_test'
ARMS = (  # (name, config, override folder or '')
    ('unet', 'unet', ''),
    ('mtl0', 'mtl0', ''),
    ('mtl3', 'mtl3', ''),
    ('mtl4 leak-free', 'mtl4', ''),
    ('mtl4 matched control', 'mtl4', 'paper_protocol_matched_control=True'),
    ('mtl4 paper protocol', 'mtl4', 'paper_protocol_train_on_test_images=True'),
)
# (name, arm A, arm B, the measures compared): each difference is B - A.
COMPARISONS = (
    ('the diagnosis task, at mtl0 (mtl0 - unet)', 'unet', 'mtl0', ('dsc',)),
    ('the full method (mtl3 - unet)', 'unet', 'mtl3', ('dsc',)),
    ('reverse learning + CBAM (mtl3 - mtl0)', 'mtl0', 'mtl3', ('dsc', 'auc', 'ba_val')),
    ('extra melanomas, leak-free (mtl4 - mtl3)', 'mtl3', 'mtl4 leak-free',
     ('dsc', 'auc', 'ba_val')),
    ('the leak (paper protocol - matched control)', 'mtl4 matched control',
     'mtl4 paper protocol', ('auc', 'tpr', 'tnr', 'ba', 'ba_val', 'dsc')),
    ('the budget and prior (matched control - leak-free)', 'mtl4 leak-free',
     'mtl4 matched control', ('auc', 'tpr', 'tnr', 'ba', 'ba_val', 'dsc')),
    ('both, as compared before (paper protocol - leak-free)', 'mtl4 leak-free',
     'mtl4 paper protocol', ('auc', 'tpr', 'tnr', 'ba', 'ba_val', 'dsc')),
)
MEASURES = {  # key -> heading
    'dsc': 'DSC', 'auc': 'AUC', 'ap': 'AP', 'tpr': 'TPR@0.5', 'tnr': 'TNR@0.5', 'ba': 'BA@0.5',
    'tpr_val': 'TPR@val', 'tnr_val': 'TNR@val', 'ba_val': 'BA@val', 'ece': 'ECE',
    'brier': 'Brier', 'bss': 'BSS',
}
POWER = 0.8
ALPHA = 0.05


# ------------------------------------------------------------------------------- statistics

def youden_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
  """The threshold t (melanoma when p >= t) that maximises TPR + TNR - 1 on (labels, probs):
  the midpoint between the two probabilities the best cut falls between (the lowest such cut
  on ties). 0.5 when either class is missing."""
  y, p = np.asarray(labels, int), np.asarray(probs, np.float64)
  if y.min(initial=1) == y.max(initial=0):
    return 0.5
  values = np.unique(p)
  cuts = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]])
  pos, neg = p[y == 1], p[y == 0]
  j = [np.mean(pos >= t) + np.mean(neg < t) - 1 for t in cuts]
  return float(cuts[int(np.argmax(j))])


def decisions(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
  """Melanoma recall (tpr), benign recall (tnr) and balanced accuracy (ba) at `threshold`."""
  y, called = np.asarray(labels, int), np.asarray(probs) >= threshold
  tpr = float(np.mean(called[y == 1])) if np.any(y == 1) else float('nan')
  tnr = float(np.mean(~called[y == 0])) if np.any(y == 0) else float('nan')
  return {'tpr': tpr, 'tnr': tnr, 'ba': (tpr + tnr) / 2}


def delong(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
  """DeLong, DeLong and Clarke-Pearson (1988): (AUC of a, AUC of b, two-sided p of their
  difference) for two scores of the same images. p is 1 when the difference has no variance."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  y = np.asarray(labels, int)
  pos, neg = y == 1, y == 0
  m, n = int(pos.sum()), int(neg.sum())

  def components(s):
    s = np.asarray(s, np.float64)
    x, z = s[pos][:, None], s[neg][None, :]
    psi = (x > z) + 0.5 * (x == z)
    return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)   # AUC, V10 (m,), V01 (n,)

  auc_a, v10_a, v01_a = components(a)
  auc_b, v10_b, v01_b = components(b)
  s10 = np.cov(np.stack([v10_a, v10_b]))
  s01 = np.cov(np.stack([v01_a, v01_b]))
  var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
  if var <= 1e-15:
    return float(auc_a), float(auc_b), 1.0
  z = (auc_b - auc_a) / math.sqrt(var)
  return float(auc_a), float(auc_b), float(2 * stats.norm.sf(abs(z)))


def welch_p(a: list[float], b: list[float]) -> float:
  """Two-sided p of Welch's t-test (nan with fewer than 2 values a side or no variance)."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  if len(a) < 2 or len(b) < 2 or (np.std(a) == 0 and np.std(b) == 0):
    return float('nan')
  return float(stats.ttest_ind(b, a, equal_var=False).pvalue)


def seeds_for_power(a: list[float], b: list[float], *, power: float = POWER,
                    alpha: float = ALPHA) -> float:
  """Seeds per arm for a two-sample t-test to detect the observed difference of means with
  `power` at two-sided `alpha` (normal approximation, pooled standard deviation); inf when the
  means are equal."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  d = abs(np.mean(b) - np.mean(a))
  s = math.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / 2)
  if d == 0:
    return math.inf
  z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
  return float(max(2, math.ceil(2 * (z * s / d) ** 2)))


def paired_bootstrap(stat: Callable[[np.ndarray], float], n: int, *, num_samples: int = 2000,
                     seed: int = 0) -> tuple[float, float, float]:
  """(low, high, p): the 95 % percentile interval of stat(resampled image indices) and the
  two-sided bootstrap p-value of stat = 0 (twice the smaller tail, at most 1)."""
  rng = np.random.default_rng(seed)
  values = np.array([stat(rng.integers(0, n, n)) for _ in range(num_samples)], np.float64)
  values = values[np.isfinite(values)]
  if not len(values):
    return float('nan'), float('nan'), float('nan')
  lo, hi = np.percentile(values, [2.5, 97.5])
  p = min(1.0, 2 * min(np.mean(values <= 0), np.mean(values >= 0)))
  return float(lo), float(hi), float(p)


# ------------------------------------------------------------------------------------ the arms

@dataclasses.dataclass
class Seed:
  """One seed's per-image outputs on the test set and its validation split."""
  number: int                    # the member's seed (its run's first seed + its index)
  dice: np.ndarray | None        # (N,) per-image Dice on the test set
  probs: np.ndarray | None       # (N,) melanoma probabilities on the test set
  val_labels: np.ndarray | None
  val_probs: np.ndarray | None

  @property
  def threshold_val(self) -> float:
    """The threshold chosen on this seed's validation split (Youden's J)."""
    if not hasattr(self, '_threshold'):
      self._threshold = youden_threshold(self.val_labels, self.val_probs)
    return self._threshold

  def measure(self, key: str, y: np.ndarray, idx=slice(None)) -> float:
    """One measure (a key of MEASURES) on the test images `idx` with labels y."""
    if key == 'dsc':
      return float(np.mean(self.dice[idx]))
    yy, p = y[idx], self.probs[idx]
    if key == 'auc':
      return metrics.roc_auc(yy, p)
    if key == 'ap':
      return metrics.average_precision(yy, p)
    if key in ('tpr', 'tnr', 'ba'):
      return decisions(yy, p, 0.5)[key]
    if key in ('tpr_val', 'tnr_val', 'ba_val'):
      return decisions(yy, p, self.threshold_val)[key[:-4]]
    if key == 'ece':
      return metrics.expected_calibration_error(yy, p)
    if key == 'brier':
      return metrics.brier_score(yy, p)
    if key == 'bss':
      prevalence = float(np.mean(self.val_labels))
      constant = float(np.mean((yy - prevalence) ** 2))
      return 1 - metrics.brier_score(yy, p) / constant if constant > 0 else float('nan')
    raise KeyError(key)

  def has(self, key: str) -> bool:
    return self.dice is not None if key == 'dsc' else self.probs is not None

  @property
  def collapsed(self) -> bool:
    """Whether the classifier answers one constant on the validation split (a collapse to the
    prior, visible before the test set is looked at)."""
    return self.val_probs is not None and float(np.ptp(self.val_probs)) < 1e-6


@dataclasses.dataclass
class Arm:
  """An arm: its runs' seeds pooled, evaluated on the same test images."""
  name: str
  folder: str                    # the first run's folder
  metrics: dict                  # the first run's metrics.json
  ids: list[str]
  labels: np.ndarray
  seeds: list[Seed]

  def per_seed(self, key: str, idx=slice(None)) -> list[float]:
    return [s.measure(key, self.labels, idx) for s in self.seeds]

  @property
  def ensemble_probs(self) -> np.ndarray | None:
    """The ensemble of the arm's seeds: their mean melanoma probability (None without one)."""
    if not self.seeds or self.seeds[0].probs is None:
      return None
    return np.mean([s.probs for s in self.seeds], axis=0)

  def without_collapsed(self) -> Arm:
    """The arm without its collapsed seeds (Seed.collapsed)."""
    return dataclasses.replace(self, seeds=[s for s in self.seeds if not s.collapsed])


def _read_csv(path: str) -> list[dict]:
  with open(path, encoding='utf-8') as f:
    return sorted(csv.DictReader(f), key=lambda r: r['id'])


def _columns(rows, prefix, k):
  names = [f'{prefix}_member{i}' for i in range(k)] if k > 1 else [prefix]
  if not rows or any(n not in rows[0] for n in names):
    return None
  return [np.array([float(r[n]) for r in rows]) for n in names]


def load_arm(name: str, folder: str, first_seed: int = 0) -> Arm:
  """An arm from one run folder (metrics.json and the per-image CSVs; one run of K seeds, the
  first seeded `first_seed`)."""
  with open(os.path.join(folder, 'metrics.json'), encoding='utf-8') as f:
    m = json.load(f)
  k = int(m.get('num_seeds', 1))
  rows = _read_csv(os.path.join(folder, f'per_image_{EVAL_SET}.csv'))
  labels = np.array([int(r['label']) for r in rows])
  dice, probs = _columns(rows, 'dice', k), _columns(rows, 'melanoma_prob', k)
  val_labels, val_probs = None, [None] * k
  if probs is not None:
    val = _read_csv(os.path.join(folder, 'per_image_validation.csv'))
    val_labels = np.array([int(r['label']) for r in val])
    val_probs = _columns(val, 'melanoma_prob', k)
  seeds = [Seed(first_seed + i, None if dice is None else dice[i],
                None if probs is None else probs[i], val_labels, val_probs[i]) for i in range(k)]
  arm = Arm(name, folder, m, [r['id'] for r in rows], labels, seeds)
  # The CSV must be the one metrics.json was computed from.
  members = m[EVAL_SET].get('members') or [m[EVAL_SET]]
  for s, member in zip(seeds, members):
    if s.dice is not None and not np.isclose(np.mean(s.dice), member['dice']):
      raise ValueError(f'{folder}: per-image Dice do not give metrics.json\'s DSC')
    if s.probs is not None and not np.isclose(metrics.roc_auc(labels, s.probs), member['auc']):
      raise ValueError(f'{folder}: per-image probabilities do not give metrics.json\'s AUC')
  return arm


def pool(runs: list[Arm]) -> Arm:
  """One arm from several runs of it (the same test images, the same number of steps): their
  seeds together."""
  first = runs[0]
  for run in runs[1:]:
    if run.ids != first.ids or not np.array_equal(run.labels, first.labels):
      raise ValueError(f'{run.folder} and {first.folder} were evaluated on different images')
    if run.metrics.get('steps') != first.metrics.get('steps'):
      raise ValueError(f'{run.folder} trained {run.metrics.get("steps")} steps, '
                       f'{first.folder} {first.metrics.get("steps")}: not one arm')
  return dataclasses.replace(first, seeds=[s for run in runs for s in run.seeds])


def find_arms(docs_dir: str) -> dict[str, Arm]:
  """The arms present under DOCS_DIR/arms, by name, each pooling its runs seed<N>/ (N the
  first member's seed)."""
  out = {}
  for name, config, override in ARMS:
    base = os.path.join(docs_dir, 'arms', f'{config}-study')
    firsts = sorted(int(d[4:]) for d in (os.listdir(base) if os.path.isdir(base) else [])
                    if d.startswith('seed') and d[4:].isdigit())
    runs = [load_arm(name, os.path.join(base, f'seed{n}', override), n) for n in firsts
            if os.path.exists(os.path.join(base, f'seed{n}', override, 'metrics.json'))]
    if runs:
      out[name] = pool(runs)
  return out


# ------------------------------------------------------------------------------------- tables

def _pm(values: list[float], scale: float = 100) -> str:
  v = [x for x in values if np.isfinite(x)]
  if not v:
    return '-'
  mean, std = tables.mean_std([scale * x for x in v])
  return f'{mean:.2f} ± {std:.2f}' if len(v) > 1 else f'{mean:.2f}'


def arms_table(arms: dict[str, Arm]) -> str:
  """Markdown: every measure of every arm, mean ± std over seeds."""
  keys = list(MEASURES)
  lines = ['| arm | seeds | steps | ' + ' | '.join(MEASURES[k] for k in keys) + ' |',
           '| --- | --- | --- | ' + ' | '.join('---' for _ in keys) + ' |']
  for arm in arms.values():
    cells = []
    for k in keys:
      if not arm.seeds[0].has(k):
        cells.append('-')
      elif k in ('ece', 'brier'):
        cells.append('{:.3f} ± {:.3f}'.format(*tables.mean_std(arm.per_seed(k))))
      else:
        cells.append(_pm(arm.per_seed(k)))
    lines.append(f'| {arm.name} | {len(arm.seeds)} | {arm.metrics.get("steps")} | '
                 + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def comparison_rows(arms: dict[str, Arm], *, num_samples: int = 2000,
                    comparisons=COMPARISONS) -> list[dict]:
  """Every comparison of `comparisons` whose two arms are present, measure by measure."""
  rows = []
  for title, name_a, name_b, keys in comparisons:
    if name_a not in arms or name_b not in arms:
      continue
    a, b = arms[name_a], arms[name_b]
    if a.ids != b.ids:
      raise ValueError(f'{a.folder} and {b.folder} were evaluated on different images')
    for key in keys:
      va, vb = a.per_seed(key), b.per_seed(key)
      diff = lambda idx: float(np.mean(b.per_seed(key, idx)) - np.mean(a.per_seed(key, idx)))
      lo, hi, p_boot = paired_bootstrap(diff, len(a.labels), num_samples=num_samples)
      row = {'comparison': title, 'measure': MEASURES[key], 'a': va, 'b': vb,
             'diff': float(np.mean(vb) - np.mean(va)), 'low': lo, 'high': hi,
             'p_bootstrap': p_boot, 'p_welch': welch_p(va, vb),
             'seeds_for_power': seeds_for_power(va, vb)}
      if key == 'auc':
        row['p_delong'] = delong(a.labels, a.ensemble_probs, b.ensemble_probs)[2]
      rows.append(row)
  return rows


def _p(v: float) -> str:
  return '-' if not np.isfinite(v) else ('< 0.001' if v < 0.001 else f'{v:.3f}')


def comparisons_table(rows: list[dict]) -> str:
  lines = ['| comparison (B - A) | measure | A | B | B - A [95 % CI] | p, images | p, seeds '
           '(Welch) | p, DeLong | seeds for 80 % power |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in rows:
    power = r['seeds_for_power']
    lines.append(
        f'| {r["comparison"]} | {r["measure"]} | {_pm(r["a"])} | {_pm(r["b"])} | '
        f'{100 * r["diff"]:+.2f} [{100 * r["low"]:+.2f}, {100 * r["high"]:+.2f}] | '
        f'{_p(r["p_bootstrap"])} | {_p(r["p_welch"])} | {_p(r.get("p_delong", math.nan))} | '
        f'{"-" if not math.isfinite(power) else f"{power:.0f}"} |')
  return '\n'.join(lines) + '\n'


def seeds_table(arms: dict[str, Arm]) -> str:
  """Markdown: each seed of each arm on its own (the mean ± std of the arms table can hide one
  seed unlike the others), with its AUC on the validation split (images no arm trains on, the
  paper protocol's included) and the spread of its melanoma probability over the test images:
  a range of 0 is a classifier that answers one constant for every image (AUC 0.5)."""
  keys = ('dsc', 'auc', 'tpr', 'tnr', 'ba')
  lines = ['| arm | seed | ' + ' | '.join(MEASURES[k] for k in keys)
           + ' | AUC on validation | melanoma probability, min-max on test |',
           '| --- | --- | ' + ' | '.join('---' for _ in keys) + ' | --- | --- |']
  for arm in arms.values():
    for seed in arm.seeds:
      cells = [f'{100 * seed.measure(k, arm.labels):.2f}' if seed.has(k) else '-' for k in keys]
      spread = (f'{np.min(seed.probs):.3f}-{np.max(seed.probs):.3f}'
                + (' (constant)' if np.ptp(seed.probs) < 1e-6 else '')
                if seed.probs is not None else '-')
      val_auc = (f'{100 * metrics.roc_auc(seed.val_labels, seed.val_probs):.2f}'
                 if seed.val_probs is not None else '-')
      lines.append(f'| {arm.name} | {seed.number} | ' + ' | '.join(cells)
                   + f' | {val_auc} | {spread} |')
  return '\n'.join(lines) + '\n'


def without_collapsed_table(arms: dict[str, Arm], *, num_samples: int = 2000) -> str:
  """Markdown: the leak's and the budget's comparisons again without the collapsed seeds (a
  sensitivity analysis), after a line naming the seeds left out."""
  dropped = [f'{a.name} seed {s.number}' for a in arms.values() for s in a.seeds if s.collapsed]
  if not dropped:
    return 'No seed collapsed.\n'
  healthy = {n: a.without_collapsed() for n, a in arms.items()}
  if any(not a.seeds for a in healthy.values()):
    return 'Every seed of an arm collapsed: no comparison without them.\n'
  chosen = tuple(c for c in COMPARISONS if c[0].startswith(('the leak', 'the budget')))
  rows = comparison_rows(healthy, num_samples=num_samples, comparisons=chosen)
  return ('Left out (one constant melanoma probability on the validation split): '
          + ', '.join(dropped) + '.\n\n' + comparisons_table(rows))


def thresholds_table(arms: dict[str, Arm]) -> str:
  """The validation-chosen thresholds per arm and seed."""
  lines = ['| arm | threshold chosen on each seed\'s validation split | validation melanomas |',
           '| --- | --- | --- |']
  for arm in arms.values():
    if arm.seeds[0].probs is None:
      continue
    ts = [s.threshold_val for s in arm.seeds]
    lines.append(f'| {arm.name} | {", ".join(f"{t:.3f}" for t in ts)} | '
                 f'{int(arm.seeds[0].val_labels.sum())} of {len(arm.seeds[0].val_labels)} |')
  return '\n'.join(lines) + '\n'


# ------------------------------------------------------------------------------- the curves

def read_curve(path: str) -> list[dict]:
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_curves(curves: dict[str, list[dict]], path: str, title: str) -> None:
  """Validation DSC and AUC (the members' mean, solid; the ensemble, dashed) against epochs."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for (name, rows), color in zip(curves.items(), plt.cm.tab10.colors):
    if not rows:
      continue
    per_epoch = rows[0]['step']
    epochs = [r['step'] / per_epoch for r in rows]
    for ax, key in zip(axes, ('dice', 'auc')):
      if f'validation/{key}' in rows[0]:
        ax.plot(epochs, [100 * r[f'validation/{key}'] for r in rows], color=color, label=name)
        if f'validation/ensemble_{key}' in rows[0]:
          ax.plot(epochs, [100 * r[f'validation/ensemble_{key}'] for r in rows], color=color,
                  linestyle='--', linewidth=0.8)
  for ax, label in zip(axes, ('validation DSC', 'validation AUC')):
    ax.set_xlabel('epoch')
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def pilot_table(rows: list[dict]) -> str:
  """The pilot's validation curve, epoch by epoch (members' mean and ensemble)."""
  if not rows:
    return ''
  per_epoch = rows[0]['step']
  lines = ['| epoch | DSC | AUC | ensemble DSC | ensemble AUC |', '| --- | --- | --- | --- | --- |']
  for r in rows:
    cell = lambda k: f'{100 * r[k]:.2f}' if k in r else '-'
    lines.append(f'| {r["step"] // per_epoch} | {cell("validation/dice")} | '
                 f'{cell("validation/auc")} | {cell("validation/ensemble_dice")} | '
                 f'{cell("validation/ensemble_auc")} |')
  return '\n'.join(lines) + '\n'


def write_study(docs_dir: str, figures_dir: str, *, num_samples: int = 2000) -> dict[str, str]:
  """Writes the study's tables into `docs_dir` and its figures into `figures_dir`; returns
  {table name: markdown}."""
  out = {}
  pilot = os.path.join(docs_dir, 'pilot', 'mtl3-study', 'seed0', 'validation_curve.jsonl')
  if os.path.exists(pilot):
    rows = read_curve(pilot)
    out['study_pilot.md'] = pilot_table(rows)
    plot_curves({'mtl3 (pilot, 3 seeds)': rows},
                os.path.join(figures_dir, 'real_data_study_pilot.png'),
                'Pilot: mtl3 at the study size, validation split (74 images) after every epoch')
  arms = find_arms(docs_dir)
  if arms:
    out['study_arms.md'] = arms_table(arms)
    out['study_seeds.md'] = seeds_table(arms)
    out['study_thresholds.md'] = thresholds_table(arms)
    out['study_comparisons.md'] = comparisons_table(comparison_rows(arms,
                                                                    num_samples=num_samples))
    out['study_without_collapsed.md'] = without_collapsed_table(arms, num_samples=num_samples)
    curves = {n: read_curve(os.path.join(a.folder, 'validation_curve.jsonl'))
              for n, a in arms.items()
              if os.path.exists(os.path.join(a.folder, 'validation_curve.jsonl'))}
    if curves:
      plot_curves(curves, os.path.join(figures_dir, 'real_data_study_arms.png'),
                  'Every arm: validation split after every epoch (members\' mean; dashed: '
                  'ensemble)')
  for name, text in out.items():
    with open(os.path.join(docs_dir, name), 'w', encoding='utf-8') as f:
      f.write(text)
  return out


def main(argv):
  args = argv[1:]
  page = next((a.split('=', 1)[1] for a in args if a.startswith('--page=')), None)
  args = [a for a in args if not a.startswith('--page=')]
  if len(args) != 1 or not os.path.isdir(args[0]):
    sys.exit('usage: python -m skinmtl_jax.study DOCS_DIR [--page=PAGE.md]')
  if page and not os.path.isfile(page):  # before anything is written
    sys.exit(f'skinmtl_jax.study: --page={page} is not a file: --page fills the '
             '`<!-- table NAME -->` blocks of an existing page (docs/real_data_study.md).')
  figures = os.path.join(os.path.dirname(os.path.abspath(page)) if page else args[0], 'figures')
  try:
    generated = write_study(args[0], figures)
    for name, text in generated.items():
      print(f'## {name}\n\n{text}')
    if page:
      with open(page, encoding='utf-8') as f:
        text = tables.fill_page(f.read(), generated)
      with open(page, 'w', encoding='utf-8') as f:
        f.write(text)
      print(f'Filled the tables of {page}.')
  except (OSError, ValueError, KeyError) as e:
    sys.exit(f'skinmtl_jax.study: {e}')


if __name__ == '__main__':
  main(sys.argv)
