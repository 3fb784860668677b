"""skinmtl_jax.tables: the ladder's tables, seeds pooled as mean ± std, and the leakage table,
checked against small hand-made runs."""

import json
import shutil

import pytest

from conftest import ROOT
from skinmtl_jax import tables


def _run(root, name, metrics, per_image=None):
  folder = root / name
  folder.mkdir(parents=True)
  (folder / 'metrics.json').write_text(json.dumps(metrics))
  if per_image:
    (folder / 'per_image_isic2016_test.csv').write_text(per_image)


def _measures(dice, recall, auc):
  return {'dice': dice, 'iou': 0.7, 'mcc': 0.8, 'tpr_weighted': 0.75, 'tnr': 0.9,
          'f1_weighted': 0.76, 'recall_melanoma': recall, 'auc': auc, 'ap': 0.5}


# The F1 cell carries a dagger: Table 3's 81.79 disagrees with its own confusion matrix (81.00).
MTL3_ROW = '| mtl3 | paper (one run) | | 10.90 | 89.37 | 82.08 | 85.07 | 81.79 | 91.12 | 81.79† | 44.00 | - | - | |'


def test_two_seed_runs_give_mean_and_sample_std(tmp_path):
  for seed, (dice, recall) in enumerate([(0.80, 0.5), (0.90, 0.7)]):
    _run(tmp_path, f'mtl3-cpu/seed{seed}', {'params': 2_700_000, 'train_seconds_this_run': 90,
                                            'isic2016_test': _measures(dice, recall, 0.8)})
  text = tables.seed_table(tables.find_groups(str(tmp_path)), 'isic2016_test')
  # mean 85, std sqrt(((80-85)^2 + (90-85)^2) / 1) = 7.07; recall 60 ± 14.14.
  assert ('| mtl3 | ours, mean ± std | 2 | 2.70 | 85.00 ± 7.07 | 70.00 ± 0.00 | 80.00 ± 0.00 | '
          '75.00 ± 0.00 | 90.00 ± 0.00 | 76.00 ± 0.00 | 60.00 ± 14.14 | 80.00 ± 0.00 | '
          '50.00 ± 0.00 | 3.0 |') in text
  assert MTL3_ROW in text   # melanoma recall 33 / 75 from the paper's confusion matrix
  assert "† Table 3 prints 81.79 for MTL3's F1; its confusion matrix gives 81.00" in text


def test_an_ensemble_run_pools_its_members_like_separate_runs(tmp_path):
  members = [_measures(0.80, 0.5, 0.8), _measures(0.90, 0.7, 0.8)]
  _run(tmp_path, 'mtl3-cpu/seed0', {'params': 2_700_000, 'isic2016_test': {
      **_measures(0.85, 0.6, 0.8), 'members': members, 'ensemble': _measures(0.88, 0.65, 0.82)}})
  text = tables.seed_table(tables.find_groups(str(tmp_path)), 'isic2016_test')
  assert '| mtl3 | ours, mean ± std | 2 | 2.70 | 85.00 ± 7.07 |' in text
  assert '| mtl3 | ours, ensemble of 2 | | | 88.00 | 70.00 |' in text
  assert '| 65.00 | 82.00 | 50.00 |' in text


CSV_CLEAN = 'id,label,melanoma_prob\na,1,0.4\nb,1,0.6\nc,0,0.5\nd,0,0.1\n'
CSV_LEAKY = 'id,label,melanoma_prob\nd,0,0.2\nc,0,0.1\nb,1,0.8\na,1,0.9\n'


def _mtl4_runs(root, clean_auc):
  """Leak-free mtl4 and mtl4 trained on test images, one seed each, with per-image files."""
  _run(root, 'mtl4-cpu/seed0', {'params': 1, 'isic2016_test': _measures(0.8, 0.5, clean_auc)},
       CSV_CLEAN)
  _run(root, 'mtl4-cpu/seed0/paper_protocol_train_on_test_images=True',
       {'params': 1, 'trained_on_test_images': True,
        'isic2016_test': _measures(0.8, 1.0, 1.0)}, CSV_LEAKY)
  return tables.find_groups(str(root))


def test_leakage_table_differences_and_chance_levels(tmp_path):
  groups = _mtl4_runs(tmp_path, clean_auc=0.75)
  assert [g.label for g in groups] == ['mtl4', 'mtl4, trained on test images']
  text = tables.leakage_table(groups, num_samples=200)
  # Recall: 1 of 2 melanomas at 0.5 against 2 of 2; AUC 3/4 against 1 (rows are matched by id).
  assert '| melanoma recall | 50.00 ± 0.00 | 100.00 ± 0.00 | +50.00 [' in text
  assert '| AUC | 75.00 ± 0.00 | 100.00 ± 0.00 | +25.00 [' in text
  assert 'random ranking (melanoma share): 50.00' in text
  # Always benign: weighted F1 = 0.5 * F1(benign) = 0.5 * 2/3.
  assert 'Weighted F1 of always answering benign: 33.33' in text


def test_leakage_table_refuses_a_stale_per_image_file(tmp_path):
  groups = _mtl4_runs(tmp_path, clean_auc=0.9)   # the CSV gives 0.75
  with pytest.raises(ValueError, match='does not give the AUC in metrics.json'):
    tables.leakage_table(groups, num_samples=10)


def test_the_real_data_page_shows_the_tables_of_its_committed_runs(tmp_path):
  """docs/real_data_cpu.md quotes what `tables --seeds` makes of the runs committed under
  docs/real_data_cpu/ (regenerated here): no table on the page is edited by hand or stale."""
  runs = tmp_path / 'runs'
  shutil.copytree(ROOT / 'docs' / 'real_data_cpu', runs)
  page = (ROOT / 'docs' / 'real_data_cpu.md').read_text(encoding='utf-8')
  generated = tables.write_seed_tables(str(runs))
  assert {'seeds_isic2016_test.md', 'seeds_ph2.md'} <= set(generated)
  assert tables.fill_page(page, generated) == page, (
      'docs/real_data_cpu.md differs from its regenerated tables: run python -m '
      'skinmtl_jax.tables --seeds docs/real_data_cpu --page=docs/real_data_cpu.md')
  for name in generated:
    assert f'<!-- table {name} -->' in page


def test_fill_page_replaces_only_between_its_markers():
  page = 'a\n<!-- table t.md -->\nold\n<!-- end table -->\nb <!-- table u.md -->x<!-- end table -->'
  assert tables.fill_page(page, {'t.md': '| new |\n', 'u.md': 'y'}) == (
      'a\n<!-- table t.md -->\n| new |\n<!-- end table -->\nb <!-- table u.md -->\ny\n'
      '<!-- end table -->')
  with pytest.raises(ValueError, match="table 'u.md'"):
    tables.fill_page(page, {'t.md': ''})
