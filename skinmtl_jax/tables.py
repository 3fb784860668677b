"""One table across the runs of the ablation ladder, ours beside the paper's.

    python -m skinmtl_jax.tables RUNS_DIR

reads RUNS_DIR/<config>/metrics.json for unet, resnet50, mtl0-mtl4 (those present) and writes
RUNS_DIR/table3_isic2016.md and RUNS_DIR/table4_ph2.md (the paper's Tables 3 and 4).
"""

from __future__ import annotations

import json
import os
import sys

from skinmtl_jax import paper

LADDER = ('resnet50', 'unet', 'mtl0', 'mtl1', 'mtl2', 'mtl3', 'mtl4')
COLUMNS = ('TPR', 'TNR', 'F1', 'MCC', 'IoU', 'DSC', 'AUC')


def _ours(r: dict) -> list:
  keys = ('tpr_weighted', 'tnr', 'f1_weighted', 'mcc', 'iou', 'dice', 'auc')
  return [None if r.get(k) is None else 100 * r[k] for k in keys]


def table(runs_dir: str, eval_set: str) -> str:
  """Markdown table for `eval_set` over the ladder's runs found in `runs_dir`."""
  fmt = lambda v: '-' if v is None else f'{v:.2f}'
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
                     + ' | '.join(fmt(v) for v in _ours(r)) + ' |')
    row = paper.paper_row(name, eval_set)
    if row is not None:
      params, cm, tpr, tnr, f1, mcc, iou, dsc = row
      lines.append(f'| {name} | paper | {params:.2f} | {cm or "-"} | '
                   + ' | '.join(fmt(v) for v in (tpr, tnr, f1, mcc, iou, dsc, None)) + ' |')
  return '\n'.join(lines) + '\n'


def main(argv):
  if len(argv) != 2:
    sys.exit('usage: python -m skinmtl_jax.tables RUNS_DIR')
  for eval_set, out in (('isic2016_test', 'table3_isic2016.md'), ('ph2', 'table4_ph2.md')):
    text = table(argv[1], eval_set)
    with open(os.path.join(argv[1], out), 'w', encoding='utf-8') as f:
      f.write(text)
    print(text)


if __name__ == '__main__':
  main(sys.argv)
