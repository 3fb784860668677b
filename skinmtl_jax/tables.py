"""Tables across runs, ours beside the paper's.

    python -m skinmtl_jax.tables RUNS_DIR
    python -m skinmtl_jax.tables --seeds RUNS_DIR [--page=PAGE.md]
    python -m skinmtl_jax.tables --ladder      # prints the ladder's configs (launch/ladder.sh)

The first form reads RUNS_DIR/<config>/metrics.json for unet, resnet50, mtl0-mtl4 (those
present; one run per rung, as launch/ladder.sh leaves them) and writes RUNS_DIR/table3_isic2016.md
and RUNS_DIR/table4_ph2.md (the paper's Tables 3 and 4).

The second reads every metrics.json under RUNS_DIR (as launch/sweep.py leaves them:
<config>[-<size>]/seed<N>[/<overrides>]/metrics.json), pools the seeds of each rung (separate
runs, or the members of a seed ensemble) and writes, as markdown:
  seeds_isic2016_test.md, seeds_ph2.md  every measure as mean ± std over seeds, the paper's row
                                        beside it, and each ensemble's own row;
  leakage.md                            mtl4 trained on test images (the paper's protocol)
                                        against leak-free mtl4: the difference in melanoma
                                        recall, AUC and AP with paired bootstrap intervals
                                        over test images, and the chance levels.
and, with --page, puts them into PAGE.md between its `<!-- table NAME -->` and
`<!-- end table -->` markers (fill_page).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys

import numpy as np

from skinmtl_jax import metrics, paper

LADDER = ('resnet50', 'unet', 'mtl0', 'mtl1', 'mtl2', 'mtl3', 'mtl4')
COLUMNS = ('TPR', 'TNR', 'F1', 'MCC', 'IoU', 'DSC', 'AUC')
# The seed table: (heading, metrics.json key, the paper's field).
SEED_COLUMNS = (('DSC', 'dice', 'dsc'), ('IoU', 'iou', 'iou'), ('MCC', 'mcc', 'mcc'),
                ('TPR', 'tpr_weighted', 'tpr'), ('TNR', 'tnr', 'tnr'),
                ('F1', 'f1_weighted', 'f1'), ('Mel. recall', 'recall_melanoma', 'melanoma_recall'),
                ('AUC', 'auc', None), ('AP', 'ap', None))
EVAL_SETS = {'isic2016_test': 'table3_isic2016.md', 'ph2': 'table4_ph2.md'}
THRESHOLD = 0.5  # the decision threshold of every shipped config


def _fmt(v) -> str:
  return '-' if v is None else f'{v:.2f}'


def _ours(r: dict) -> list:
  keys = ('tpr_weighted', 'tnr', 'f1_weighted', 'mcc', 'iou', 'dice', 'auc')
  return [None if r.get(k) is None else 100 * r[k] for k in keys]


def table(runs_dir: str, eval_set: str) -> str:
  """Markdown table for `eval_set` over the ladder's runs found in `runs_dir`."""
  lines = [f'# {eval_set}: ours (this repository) and the paper', '',
           '| ID | source | Param. [M] | confusion B / M | ' + ' | '.join(COLUMNS) + ' |',
           '| --- | --- | --- | --- | ' + ' | '.join('---' for _ in COLUMNS) + ' |']
  for name in LADDER:
    path = os.path.join(runs_dir, name, 'metrics.json')
    if os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        m = json.load(f)
      if eval_set in m:
        r = m[eval_set]
        flag = ' (trained on test images)' if m.get('trained_on_test_images') else ''
        lines.append(f'| {name} | ours{flag} | {m["params"] / 1e6:.2f} | {r.get("confusion") or "-"} | '
                     + ' | '.join(_fmt(v) for v in _ours(r)) + ' |')
    row = paper.paper_row(name, eval_set)
    if row is not None:
      lines.append(f'| {name} | paper | {row.params:.2f} | {row.confusion or "-"} | '
                   + ' | '.join(_fmt(v) for v in (row.tpr, row.tnr, row.f1, row.mcc, row.iou,
                                                  row.dsc, None)) + ' |')
  return '\n'.join(lines) + '\n'


# ------------------------------------------------------------------------ seeds pooled per rung

@dataclasses.dataclass
class Group:
  """The runs of one rung and setting that differ only in their seeds."""
  rung: str                        # the config's name: mtl4
  setting: str                     # the sweep's overrides, '' for none
  trained_on_test_images: bool
  runs: list[tuple[str, dict]]     # (run folder, its metrics.json)

  @property
  def label(self) -> str:
    flag = ', trained on test images' if self.trained_on_test_images else ''
    setting = f' {self.setting}' if self.setting and not self.trained_on_test_images else ''
    return f'{self.rung}{setting}{flag}'

  def seeds(self, eval_set: str) -> list[dict]:
    """Every seed's measures on `eval_set`: single runs, and the members of ensemble runs."""
    out = []
    for _, m in self.runs:
      r = m.get(eval_set)
      if r is not None:
        out += r.get('members') or [r]
    return out


def find_groups(runs_dir: str) -> list[Group]:
  """The runs under `runs_dir`, grouped by rung and setting, in the ladder's order."""
  groups: dict[tuple[str, str], Group] = {}
  for folder, _, files in sorted(os.walk(runs_dir)):
    if 'metrics.json' not in files:
      continue
    parts = os.path.relpath(folder, runs_dir).split(os.sep)
    seed_at = next((i for i, p in enumerate(parts) if p.startswith('seed')), None)
    if seed_at is None or seed_at == 0:
      raise ValueError(f'{folder}: expected <config>/seed<N>[/<overrides>] under {runs_dir} '
                       '(the layout of launch/sweep.py)')
    rung = parts[0].split('-')[0]                       # mtl4-cpu -> mtl4
    setting = '/'.join(parts[seed_at + 1:])
    with open(os.path.join(folder, 'metrics.json'), encoding='utf-8') as f:
      m = json.load(f)
    g = groups.setdefault((rung, setting),
                          Group(rung, setting, bool(m.get('trained_on_test_images')), []))
    g.runs.append((folder, m))
  order = lambda g: (LADDER.index(g.rung) if g.rung in LADDER else len(LADDER), g.rung,
                     g.trained_on_test_images, g.setting)
  return sorted(groups.values(), key=order)


def mean_std(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof 1; 0 for one value)."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _mean_std_cell(seeds: list[dict], key: str) -> str:
  values = [s.get(key) for s in seeds]
  if not values or any(v is None for v in values):
    return '-'
  mean, std = mean_std([100 * v for v in values])
  return f'{mean:.2f} ± {std:.2f}' if len(values) > 1 else f'{mean:.2f}'


def seed_table(groups: list[Group], eval_set: str) -> str:
  """Markdown: each rung's mean ± std over seeds on `eval_set`, the paper's row beside it."""
  heads = [h for h, _, _ in SEED_COLUMNS]
  lines = ['| ID | source | seeds | Param. [M] | ' + ' | '.join(heads) + ' | train [min] |',
           '| --- | --- | --- | --- | ' + ' | '.join('---' for _ in heads) + ' | --- |']
  shown_paper = set()
  for g in groups:
    seeds = g.seeds(eval_set)
    if not seeds:
      continue
    params = g.runs[0][1]['params'] / 1e6
    # Training time of all the group's seeds (runs resumed after a stop count their last part).
    minutes = sum(m.get('train_seconds_this_run', 0) for _, m in g.runs) / 60
    lines.append(f'| {g.label} | ours, mean ± std | {len(seeds)} | {params:.2f} | '
                 + ' | '.join(_mean_std_cell(seeds, k) for _, k, _ in SEED_COLUMNS)
                 + f' | {minutes:.1f} |')
    for _, m in g.runs:
      ens = m.get(eval_set, {}).get('ensemble')
      if ens is not None:
        lines.append(f'| {g.label} | ours, ensemble of {len(m[eval_set]["members"])} | | | '
                     + ' | '.join(_mean_std_cell([ens], k) for _, k, _ in SEED_COLUMNS) + ' | |')
    row = paper.paper_row(g.rung, eval_set)
    if row is not None and g.rung not in shown_paper:
      shown_paper.add(g.rung)
      lines.append(f'| {g.rung} | paper (one run) | | {row.params:.2f} | '
                   + ' | '.join('-' if f is None else _paper_cell(row, g.rung, eval_set, f)
                                for _, _, f in SEED_COLUMNS) + ' | |')
  notes = [paper.doubtful(rung, eval_set, f) for rung in sorted(shown_paper)
           for _, _, f in SEED_COLUMNS if f and paper.doubtful(rung, eval_set, f)]
  return '\n'.join(lines + ([''] + [f'† {n}.' for n in notes] if notes else [])) + '\n'


def _paper_cell(row, rung: str, eval_set: str, field: str) -> str:
  """A cell of the paper's row, with a dagger where its own numbers contradict it."""
  return _fmt(getattr(row, field)) + ('†' if paper.doubtful(rung, eval_set, field) else '')


# ------------------------------------------------------------------------ the cost of leakage

def _nan_if_none(v):
  return float('nan') if v is None else v


LEAKAGE_MEASURES = {
    'melanoma recall': lambda y, p: _nan_if_none(
        metrics.classification_scores(y, p, THRESHOLD)['recall_melanoma']),
    'AUC': metrics.roc_auc,
    'AP': metrics.average_precision,
}


def seed_probabilities(group: Group, eval_set: str) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(image ids, labels (N,), melanoma probabilities (seeds, N)) of a group, from each run's
  per_image_<eval_set>.csv (an ensemble's has one column per member)."""
  ids, labels, probs = None, None, []
  for folder, m in group.runs:
    path = os.path.join(folder, f'per_image_{eval_set}.csv')
    if not os.path.exists(path):
      raise ValueError(f'{path} is missing: the leakage table needs each run\'s per-image '
                       'probabilities (evaluate writes them)')
    with open(path, encoding='utf-8') as f:
      rows = sorted(csv.DictReader(f), key=lambda r: r['id'])
    run_ids, run_labels = [r['id'] for r in rows], np.array([int(r['label']) for r in rows])
    if ids is not None and run_ids != ids:
      raise ValueError(f'{path}: its images differ from those of the other runs')
    ids, labels = run_ids, run_labels
    members = m[eval_set].get('members') or [m[eval_set]]
    columns = ([f'melanoma_prob_member{i}' for i in range(len(members))]
               if len(members) > 1 else ['melanoma_prob'])
    for column, member in zip(columns, members):
      p = np.array([float(r[column]) for r in rows])
      # The CSV must be the one metrics.json was computed from.
      if not np.isclose(metrics.roc_auc(labels, p), member['auc']):
        raise ValueError(f'{path}: column {column} does not give the AUC in metrics.json')
      probs.append(p)
  return ids, labels, np.stack(probs)


def leakage_table(groups: list[Group], eval_set: str = 'isic2016_test', *,
                  num_samples: int = 2000) -> str:
  """Markdown: mtl4 under the paper's protocol against leak-free mtl4 on `eval_set`."""
  mtl4 = [g for g in groups if g.rung == 'mtl4' and not g.setting.replace(
      'paper_protocol_train_on_test_images=True', '')]
  clean = [g for g in mtl4 if not g.trained_on_test_images]
  leaky = [g for g in mtl4 if g.trained_on_test_images]
  if len(clean) != 1 or len(leaky) != 1:
    return ''
  ids_a, y, pa = seed_probabilities(clean[0], eval_set)
  ids_b, _, pb = seed_probabilities(leaky[0], eval_set)
  if ids_a != ids_b:
    raise ValueError('the two mtl4 runs were evaluated on different images')
  always_benign = metrics.classification_scores(y, np.zeros(len(y)), THRESHOLD)
  chance = {'melanoma recall': 'always benign: 0.00', 'AUC': 'any constant: 50.00',
            'AP': f'random ranking (melanoma share): {100 * y.mean():.2f}'}
  lines = [f'{eval_set}: {len(y)} images, {int(y.sum())} melanomas; '
           f'leak-free mtl4: {len(pa)} seeds; trained on test images: {len(pb)} seeds. '
           f'Differences are of the seed means, trained on test images minus leak-free, with '
           f'95 % paired bootstrap intervals over the test images ({num_samples} resamples).', '',
           '| measure | leak-free mtl4 | trained on test images | difference [95 % CI] | chance |',
           '| --- | --- | --- | --- | --- |']
  for name, fn in LEAKAGE_MEASURES.items():
    per_seed = lambda p, idx: [fn(y[idx], s[idx]) for s in p]
    a, b = per_seed(pa, slice(None)), per_seed(pb, slice(None))
    diff = lambda idx: float(np.mean(per_seed(pb, idx)) - np.mean(per_seed(pa, idx)))
    lo, hi = metrics.bootstrap_ci(diff, len(y), num_samples=num_samples)
    cell = lambda v: '{:.2f} ± {:.2f}'.format(*mean_std([100 * x for x in v]))
    lines.append(f'| {name} | {cell(a)} | {cell(b)} | {100 * (np.mean(b) - np.mean(a)):+.2f} '
                 f'[{100 * lo:+.2f}, {100 * hi:+.2f}] | {chance[name]} |')
  lines += ['', f'Weighted F1 of always answering benign: {100 * always_benign["f1_weighted"]:.2f} '
            f'(weighted TPR {100 * always_benign["tpr_weighted"]:.2f}).']
  return '\n'.join(lines) + '\n'


def write_seed_tables(runs_dir: str) -> dict[str, str]:
  """Writes the seed tables and the leakage table into `runs_dir`; returns {file: text}."""
  groups = find_groups(runs_dir)
  if not groups:
    raise ValueError(f'no metrics.json under {runs_dir}')
  out = {f'seeds_{s}.md': seed_table(groups, s) for s in EVAL_SETS}
  if (text := leakage_table(groups)):
    out['leakage.md'] = text
  for name, text in out.items():
    with open(os.path.join(runs_dir, name), 'w', encoding='utf-8') as f:
      f.write(text)
  return out


def fill_page(page: str, tables_by_name: dict[str, str]) -> str:
  """`page` (markdown) with the text between each `<!-- table NAME -->` and the next
  `<!-- end table -->` replaced by tables_by_name[NAME], so a page's tables are regenerated,
  never edited by hand."""
  out, rest = [], page
  while (start := rest.find('<!-- table ')) >= 0:
    head_end = rest.index('-->', start) + 3
    name = rest[start + len('<!-- table '):head_end - 3].strip()
    end = rest.index('<!-- end table -->', head_end)
    if name not in tables_by_name:
      raise ValueError(f'the page asks for table {name!r}; there are {sorted(tables_by_name)}')
    out += [rest[:head_end], '\n', tables_by_name[name].strip(), '\n']
    rest = rest[end:]
  return ''.join(out) + rest


def main(argv):
  args = argv[1:]
  page = next((a.split('=', 1)[1] for a in args if a.startswith('--page=')), None)
  args = [a for a in args if not a.startswith('--page=')]
  if args == ['--ladder']:  # launch/ladder.sh trains these, in this order
    print(' '.join(LADDER))
    return
  seeds = '--seeds' in args
  args = [a for a in args if a != '--seeds']
  if len(args) != 1 or not os.path.isdir(args[0]):
    sys.exit('usage: python -m skinmtl_jax.tables [--seeds] RUNS_DIR')
  if seeds:
    try:
      generated = write_seed_tables(args[0])
      for name, text in generated.items():
        print(f'## {name}\n\n{text}')
      if page:
        with open(page, encoding='utf-8') as f:
          text = fill_page(f.read(), generated)
        with open(page, 'w', encoding='utf-8') as f:
          f.write(text)
        print(f'Filled the tables of {page}.')
    except (OSError, ValueError) as e:
      sys.exit(f'skinmtl_jax.tables: {e}')
    return
  for eval_set, out in EVAL_SETS.items():
    text = table(args[0], eval_set)
    with open(os.path.join(args[0], out), 'w', encoding='utf-8') as f:
      f.write(text)
    print(text)


if __name__ == '__main__':
  main(sys.argv)
