"""The study's statistics against hand-computed cases, and its tables and figures from run files
laid out as launch/real_data_study.sh leaves them."""

import csv
import json
import math
import shutil

import numpy as np
import pytest

from conftest import ROOT
from skinmtl_jax import metrics, study, tables


def test_youden_threshold_hand_computed():
  y = np.array([0, 0, 1, 1])
  p = np.array([0.1, 0.4, 0.35, 0.8])
  # Cuts below 0.35 give TPR 1, TNR 0.5; above 0.4, TPR 0.5, TNR 1: J = 0.5 both; the lowest.
  assert study.youden_threshold(y, p) == pytest.approx((0.1 + 0.35) / 2)
  assert study.youden_threshold(np.array([0, 0, 1]), np.array([0.2, 0.3, 0.9])) == \
      pytest.approx(0.6)
  assert study.youden_threshold(np.array([1, 1]), np.array([0.2, 0.3])) == 0.5  # one class


def test_decisions_hand_computed():
  d = study.decisions(np.array([0, 0, 0, 1, 1]), np.array([0.1, 0.6, 0.2, 0.7, 0.3]), 0.5)
  assert d == pytest.approx({'tpr': 0.5, 'tnr': 2 / 3, 'ba': (0.5 + 2 / 3) / 2})


def test_delong_matches_the_auc_and_the_bootstrap_variance():
  rng = np.random.default_rng(0)
  y = np.r_[np.zeros(300, int), np.ones(100, int)]
  a = rng.normal(y * 1.0, 1.0)
  b = a + rng.normal(y * 0.3, 0.7)
  auc_a, auc_b, p = study.delong(y, a, b)
  assert auc_a == pytest.approx(metrics.roc_auc(y, a)) and auc_b == pytest.approx(
      metrics.roc_auc(y, b))
  # The same test from the bootstrap of the paired difference: close p-values.
  diffs = []
  for _ in range(1000):
    idx = rng.integers(0, len(y), len(y))
    diffs.append(metrics.roc_auc(y[idx], b[idx]) - metrics.roc_auc(y[idx], a[idx]))
  from scipy import stats
  p_boot = 2 * stats.norm.sf(abs(auc_b - auc_a) / np.std(diffs))
  assert 0 < p < 0.5 and p == pytest.approx(p_boot, rel=0.35)
  assert study.delong(y, a, a)[2] == 1.0


def test_power_and_welch_hand_computed():
  # d = 2, pooled s = 1: n = 2 (1.95996 + 0.84162)^2 / 4 = 3.92 -> 4 seeds per arm.
  assert study.seeds_for_power([0, 1, 2], [2, 3, 4]) == 4
  assert study.seeds_for_power([1, 2, 3], [1, 2, 3]) == math.inf
  from scipy import stats
  assert study.welch_p([0, 1, 2], [2, 3, 4]) == pytest.approx(
      stats.ttest_ind([2, 3, 4], [0, 1, 2], equal_var=False).pvalue)


def test_paired_bootstrap_interval_and_p():
  lo, hi, p = study.paired_bootstrap(lambda idx: 0.3, 10)
  assert (lo, hi, p) == (0.3, 0.3, 0.0)
  x = np.random.default_rng(1).normal(size=200)
  lo, hi, p = study.paired_bootstrap(lambda idx: float(np.mean(x[idx]) - np.mean(x)), 200)
  assert lo < 0 < hi and p > 0.5


def _write_run(folder, rng, *, k=3, n=80, classify=True, shift=0.0):
  """A run of k seeds on n test images (a quarter melanomas) and 20 validation images, its
  metrics.json computed from its CSVs, as evaluate writes them."""
  folder.mkdir(parents=True)
  y = (np.arange(n) % 4 == 0).astype(int)
  yv = (np.arange(20) % 4 == 0).astype(int)
  dice = [np.clip(rng.normal(0.8 + shift, 0.05, n), 0, 1) for _ in range(k)]
  probs = [1 / (1 + np.exp(-rng.normal((0.3 + 10 * shift) * y - 1, 1.5))) for _ in range(k)]
  vprobs = [1 / (1 + np.exp(-rng.normal(2 * yv - 1, 1.0))) for _ in range(k)]
  members = [{'dice': float(np.mean(d)), **({'auc': metrics.roc_auc(y, p)} if classify else {})}
             for d, p in zip(dice, probs)]
  (folder / 'metrics.json').write_text(json.dumps(
      {'num_seeds': k, 'steps': 100, study.EVAL_SET: {'members': members}}))
  with open(folder / f'per_image_{study.EVAL_SET}.csv', 'w', newline='', encoding='utf-8') as f:
    w = csv.writer(f)
    cols = ['id', 'label', 'dice'] + [f'dice_member{i}' for i in range(k)]
    if classify:
      cols += ['melanoma_prob'] + [f'melanoma_prob_member{i}' for i in range(k)]
    w.writerow(cols)
    for j in range(n):
      row = [f'ISIC_{j:07d}', y[j], np.mean([d[j] for d in dice])] + [d[j] for d in dice]
      if classify:
        row += [np.mean([p[j] for p in probs])] + [p[j] for p in probs]
      w.writerow(row)
  if classify:
    with open(folder / 'per_image_validation.csv', 'w', newline='', encoding='utf-8') as f:
      w = csv.writer(f)
      w.writerow(['id', 'label', 'melanoma_prob'] + [f'melanoma_prob_member{i}'
                                                     for i in range(k)])
      for j in range(20):
        w.writerow([f'ISIC_9{j:06d}', yv[j], np.mean([p[j] for p in vprobs])]
                   + [p[j] for p in vprobs])
  (folder / 'validation_curve.jsonl').write_text(''.join(
      json.dumps({'step': 10 * e, 'validation/dice': 0.7 + 0.01 * e,
                  'validation/auc': 0.6 + 0.02 * e}) + '\n' for e in range(1, 6)))
  return dice, probs, y


def test_the_study_tables_and_figures_from_run_files(tmp_path):
  rng = np.random.default_rng(0)
  docs = tmp_path / 'docs'
  made = {}
  for name, config, override in study.ARMS:
    shift = 0.3 if 'paper' in name else 0.0
    made[name] = _write_run(docs / 'arms' / f'{config}-study' / 'seed0' / override, rng,
                            classify=config != 'unet', shift=shift)
  _write_run(docs / 'pilot' / 'mtl3-study' / 'seed0', rng)
  out = study.write_study(str(docs), str(tmp_path / 'figures'), num_samples=200)
  assert set(out) == {'study_pilot.md', 'study_arms.md', 'study_seeds.md', 'study_thresholds.md',
                      'study_comparisons.md', 'study_without_collapsed.md'}
  assert out['study_without_collapsed.md'] == 'No seed collapsed.\n'
  assert (tmp_path / 'figures' / 'real_data_study_pilot.png').exists()
  assert (tmp_path / 'figures' / 'real_data_study_arms.png').exists()
  # The arms table: DSC mean ± std over the three seeds, by hand.
  dice, _, _ = made['mtl0']
  mean, std = tables.mean_std([100 * np.mean(d) for d in dice])
  row = next(l for l in out['study_arms.md'].splitlines() if l.startswith('| mtl0 |'))
  assert f'{mean:.2f} ± {std:.2f}' in row
  assert next(l for l in out['study_arms.md'].splitlines()
              if l.startswith('| unet |')).count(' - ') >= 5             # no classifier
  # Every comparison whose arms exist, each of its measures; the leak is large here.
  lines = out['study_comparisons.md'].splitlines()[2:]
  assert len(lines) == sum(len(c[3]) for c in study.COMPARISONS)
  leak = next(l for l in lines if l.startswith('| the leak') and '| AUC |' in l)
  assert leak.split('|')[5].strip().startswith('+')
  delong_p = leak.split('|')[8].strip()
  assert delong_p == '< 0.001' or float(delong_p) < 0.05
  page = '# x\n<!-- table study_arms.md -->\nold\n<!-- end table -->\n'
  assert 'old' not in tables.fill_page(page, out)


def test_a_run_whose_csv_is_not_its_metrics_is_refused(tmp_path):
  folder = tmp_path / 'arms' / 'mtl0-study' / 'seed0'
  _write_run(folder, np.random.default_rng(0))
  m = json.loads((folder / 'metrics.json').read_text())
  m[study.EVAL_SET]['members'][1]['dice'] += 0.1
  (folder / 'metrics.json').write_text(json.dumps(m))
  with pytest.raises(ValueError, match='Dice do not give'):
    study.find_arms(str(tmp_path))


def test_the_committed_study_page_is_what_its_files_give(tmp_path):
  """docs/real_data_study.md's tables are regenerated from the committed run files
  (docs/real_data_study/), never edited by hand: filling the page again changes nothing."""
  docs = ROOT / 'docs' / 'real_data_study'
  shutil.copytree(docs, tmp_path / 'study')
  generated = study.write_study(str(tmp_path / 'study'), str(tmp_path / 'figures'))
  page = (ROOT / 'docs' / 'real_data_study.md').read_text(encoding='utf-8')
  assert 'study_pilot.md' in generated
  assert tables.fill_page(page, generated) == page


def test_a_missing_page_is_refused_before_anything_is_written(tmp_path):
  docs = tmp_path / 'docs'
  _write_run(docs / 'pilot' / 'mtl3-study' / 'seed0', np.random.default_rng(0))
  with pytest.raises(SystemExit, match='is not a file'):
    study.main(['study', str(docs), f'--page={tmp_path / "no_page.md"}'])
  assert not list(docs.glob('study_*.md')) and not (tmp_path / 'figures').exists()


def test_the_seeds_table_shows_each_seed_and_a_constant_classifier(tmp_path):
  """A seed whose classifier answers one constant for every image (as a collapsed head does)
  is named in the seeds table with its AUC 50.00, while the arms table only shows a mean."""
  folder = tmp_path / 'docs' / 'arms' / 'mtl0-study' / 'seed0'
  _, probs, y = _write_run(folder, np.random.default_rng(1))
  rows = list(csv.DictReader((folder / 'per_image_isic2016_test.csv').open()))
  for r in rows:
    r['melanoma_prob_member1'] = '0.793'
  with (folder / 'per_image_isic2016_test.csv').open('w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  m = json.loads((folder / 'metrics.json').read_text())
  m['isic2016_test']['members'][1]['auc'] = 0.5
  (folder / 'metrics.json').write_text(json.dumps(m))
  arms = study.find_arms(str(tmp_path / 'docs'))
  lines = study.seeds_table(arms).splitlines()[2:]
  assert len(lines) == 3
  assert lines[1].startswith('| mtl0 | 1 |') and '| 50.00 |' in lines[1]
  assert 'constant' not in lines[0] + lines[2]
  auc0 = metrics.roc_auc(np.asarray(y), np.asarray(probs[0]))
  assert f'| {100 * auc0:.2f} |' in lines[0]
  val = list(csv.DictReader((folder / 'per_image_validation.csv').open()))
  val_auc1 = metrics.roc_auc(np.array([int(r['label']) for r in val]),
                             np.array([float(r['melanoma_prob_member1']) for r in val]))
  assert lines[1].endswith(f'| {100 * val_auc1:.2f} | 0.793-0.793 (constant) |')


def _set_member(folder, member, value):
  """Member `member`'s melanoma probability set to one constant on the test and validation
  CSVs (a collapsed classifier), metrics.json's AUC with it."""
  for name in (f'per_image_{study.EVAL_SET}.csv', 'per_image_validation.csv'):
    rows = list(csv.DictReader((folder / name).open()))
    for r in rows:
      r[f'melanoma_prob_member{member}'] = str(value)
    with (folder / name).open('w', newline='') as f:
      w = csv.DictWriter(f, fieldnames=list(rows[0]))
      w.writeheader()
      w.writerows(rows)
  m = json.loads((folder / 'metrics.json').read_text())
  m[study.EVAL_SET]['members'][member]['auc'] = 0.5
  (folder / 'metrics.json').write_text(json.dumps(m))


def test_an_arm_pools_the_seeds_of_its_runs(tmp_path):
  """seed0/ (members 0-2) and seed3/ (members 3-5) are one arm of six seeds; its ensemble is
  the mean of all six; a run with another number of steps is refused."""
  rng = np.random.default_rng(2)
  base = tmp_path / 'arms' / 'mtl0-study'
  _, p0, y = _write_run(base / 'seed0', rng)
  _, p3, _ = _write_run(base / 'seed3', rng)
  arm = study.find_arms(str(tmp_path))['mtl0']
  assert [s.number for s in arm.seeds] == [0, 1, 2, 3, 4, 5]
  assert arm.per_seed('auc') == pytest.approx([metrics.roc_auc(y, p) for p in p0 + p3])
  np.testing.assert_allclose(arm.ensemble_probs, np.mean(p0 + p3, axis=0))
  lines = study.seeds_table({'mtl0': arm}).splitlines()[2:]
  assert [l.split('|')[2].strip() for l in lines] == ['0', '1', '2', '3', '4', '5']
  m = json.loads((base / 'seed3' / 'metrics.json').read_text())
  (base / 'seed3' / 'metrics.json').write_text(json.dumps({**m, 'steps': 99}))
  with pytest.raises(ValueError, match='not one arm'):
    study.find_arms(str(tmp_path))


def test_the_leak_without_collapsed_seeds(tmp_path):
  """A seed constant on the validation split is left out of the sensitivity table (and named
  there), and only there: the leak's AUC is then the mean over the other seeds."""
  rng = np.random.default_rng(3)
  docs = tmp_path / 'docs'
  made = {}
  for name, config, override in study.ARMS:
    if config == 'mtl4':
      made[name] = _write_run(docs / 'arms' / 'mtl4-study' / 'seed0' / override, rng,
                              shift=0.3 if 'paper' in name else 0.0)
  paper = docs / 'arms' / 'mtl4-study' / 'seed0' / 'paper_protocol_train_on_test_images=True'
  _set_member(paper, 1, 0.793)
  arms = study.find_arms(str(docs))
  assert [s.collapsed for s in arms['mtl4 paper protocol'].seeds] == [False, True, False]
  text = study.without_collapsed_table(arms, num_samples=100)
  assert text.startswith('Left out (one constant melanoma probability on the validation '
                         'split): mtl4 paper protocol seed 1.')
  rows = [l for l in text.splitlines() if l.startswith('| the ')]
  assert len(rows) == sum(len(c[3]) for c in study.COMPARISONS
                          if c[0].startswith(('the leak', 'the budget')))
  _, probs, y = made['mtl4 paper protocol']
  kept = [100 * metrics.roc_auc(y, probs[i]) for i in (0, 2)]
  leak_auc = next(l for l in rows if l.startswith('| the leak') and '| AUC |' in l)
  assert leak_auc.split('|')[4].strip() == '{:.2f} ± {:.2f}'.format(*tables.mean_std(kept))
  # The main comparisons keep all three seeds.
  main = study.comparisons_table(study.comparison_rows(arms, num_samples=100)).splitlines()
  every = [100 * metrics.roc_auc(y, probs[0]), 50.0, 100 * metrics.roc_auc(y, probs[2])]
  leak_auc = next(l for l in main if l.startswith('| the leak') and '| AUC |' in l)
  assert leak_auc.split('|')[4].strip() == '{:.2f} ± {:.2f}'.format(*tables.mean_std(every))
