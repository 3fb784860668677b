"""TFDS builders on the real shared data, and every bad input a user can hand them."""

import os
import pathlib
import shutil
import zipfile

import ml_collections
import numpy as np
import pytest

from helpers import run_main, run_module
from skinmtl_jax import config_base, input_pipeline
from skinmtl_jax.datasets import builders
from skinmtl_jax.datasets.files import DataError

SIZE = (32, 48)


@pytest.fixture(scope='session')
def real_data_cfg(tmp_path_factory, request):
  shared = request.getfixturevalue('shared_data')
  cfg = config_base.get_config().data   # every field a data config has, then these
  cfg.update({
      'name': 'isic2016', 'manual_dir': str(shared), 'image_size': SIZE,
      'data_dir': str(tmp_path_factory.mktemp('tfds')), 'extra_melanomas': '',
      'paper_protocol_train_on_test_images': False, 'eval_sets': ('isic2016_test', 'ph2'),
      'enlarge_benign': 4, 'enlarge_melanoma': 16, 'num_workers': 0,
      'validation_fraction': 0.0})         # the counts below are of the whole training split
  return cfg


def _split(cfg, name):
  return input_pipeline.get_split(cfg, name)


def test_built_counts(real_data_cfg):
  for name, splits in {'isic2016': {'train': 749, 'test': 305},
                       'isic2017': {'train': 2000, 'validation': 150},
                       'ph2': {'test': 4}}.items():
    builder = builders.prepare(name, real_data_cfg.manual_dir, real_data_cfg.data_dir, SIZE)
    assert {s: i.num_examples for s, i in builder.info.splits.items()} == splits, name


def test_labels_of_named_cases(real_data_cfg):
  test = _split(real_data_cfg, 'isic2016_test')
  assert test.labels[test.ids.index('ISIC_0000013')] == 1
  assert test.labels[test.ids.index('ISIC_0000003')] == 0
  assert (int(test.labels.sum()), len(test.labels)) == (63, 305)
  ph2 = builders.load('ph2', 'test', real_data_cfg)
  records = {r['id'].decode() if isinstance(r['id'], bytes) else r['id']: r
             for r in (ph2[i] for i in range(len(ph2)))}
  assert records['IMD058']['label'] == 1
  assert records['IMD002']['label'] == 0 and records['IMD002']['diagnosis'] == 1  # atypical
  assert records['IMD003']['diagnosis'] == 0 and records['IMD435']['label'] == 1


def test_masks_are_binary_and_aligned_with_images(real_data_cfg):
  train = _split(real_data_cfg, 'train')
  darker, n = 0, 0
  for i in range(0, len(train.source), 15):
    ex = train.source[i]
    assert ex['image'].shape == (*SIZE, 3) and ex['mask'].shape == SIZE
    assert set(np.unique(ex['mask'])) <= {0, 1}
    m = ex['mask'].astype(bool)
    if 0 < m.mean() < 0.9:
      n += 1
      brightness = ex['image'].mean(-1)
      darker += brightness[m].mean() < brightness[~m].mean()
  # Pigmented lesions are darker than the skin around them; a shifted or flipped mask is not.
  assert n > 30 and darker / n > 0.85, (darker, n)


def test_enlarged_epoch_length_of_shared_isic2016(real_data_cfg):
  train = _split(real_data_cfg, 'train')
  assert (int((train.labels == 0).sum()), int((train.labels == 1).sum())) == (605, 144)
  _, per_epoch = input_pipeline.train_dataset(train, real_data_cfg, batch_size=10, seed=0)
  assert per_epoch == 605 * 4 + 144 * 16 == 4724


def test_mtl4_extra_melanomas_exclude_test_images(real_data_cfg):
  cfg = ml_collections.ConfigDict(real_data_cfg.to_dict())
  cfg.extra_melanomas = 'isic2017'
  train = _split(cfg, 'train')
  test_ids = set(_split(cfg, 'isic2016_test').ids)
  assert not test_ids & set(train.ids)
  assert len(train.ids) == len(set(train.ids))          # no double counting
  info = train.info['extra_melanomas']
  assert info['available'] == 404
  assert info['dropped_in_eval_set'] == 63 and info['dropped_already_in_train'] == 147
  assert info['added'] == 404 - 63 - 147 == len(train.ids) - 749
  assert train.labels[749:].min() == 1
  # A validation split held out of ISIC 2016 training stays out of training, extra melanomas
  # included (ISIC 2017 repeats ISIC 2016 training images).
  cfg.validation_fraction = 0.1
  held_train, validation = input_pipeline.train_and_validation(cfg)
  assert len(validation.ids) == 74 and not set(validation.ids) & set(held_train.ids)
  assert set(validation.ids) <= set(train.ids[:749])        # ISIC 2016 training images only
  assert int(validation.labels.sum()) == 14                 # 60 of 605 benign, 14 of 144
  held = held_train.info['extra_melanomas']
  assert held['added'] == info['added']
  assert held['dropped_already_in_train'] + held['dropped_in_validation'] == 147
  assert len(held_train.ids) == len(train.ids) - 74
  cfg.validation_fraction = 0.0
  # The paper's protocol, asked for by name, keeps them all.
  cfg.paper_protocol_train_on_test_images = True
  paper = _split(cfg, 'train')
  assert len(paper.ids) == 749 + 404 and len(test_ids & set(paper.ids)) == 63
  # Its matched control: the paper's list, position by position, with each test image replaced
  # by a melanoma the leak-free list adds; the same length (steps, melanoma share), no test image.
  cfg.paper_protocol_train_on_test_images = False
  cfg.paper_protocol_matched_control = True
  control = _split(cfg, 'train')
  assert len(control.ids) == len(paper.ids) and control.labels[749:].min() == 1
  assert not test_ids & set(control.ids)
  assert control.info['extra_melanomas']['replaced_eval_images'] == 63
  leak_free_extra = set(train.ids[749:])
  swapped = [(p, c) for p, c in zip(paper.ids, control.ids) if p != c]
  assert len(swapped) == 63
  assert all(p in test_ids and c in leak_free_extra for p, c in swapped)
  cfg.paper_protocol_matched_control = False
  # ISIC 2016's test set is never trained on, whatever data.eval_sets holds.
  cfg.eval_sets = ('ph2',)
  assert not test_ids & set(_split(cfg, 'train').ids)
  assert _split(cfg, 'train').ids == train.ids


# ------------------------------------------------------------------------------ bad input

@pytest.fixture
def small_isic2016(tmp_path, shared_data):
  """A copy of 3 training and 2 test cases of the shared ISIC 2016 in the official layout."""
  src = shared_data / 'isic2016'
  root = tmp_path / 'downloads'
  cases = {'Training': ['ISIC_0000000', 'ISIC_0000001', 'ISIC_0000002'],
           'Test': ['ISIC_0000003', 'ISIC_0000012']}
  for part, ids in cases.items():
    (root / f'ISBI2016_ISIC_Part1_{part}_Data').mkdir(parents=True)
    (root / f'ISBI2016_ISIC_Part1_{part}_GroundTruth').mkdir()
    for i in ids:
      shutil.copy(src / f'ISBI2016_ISIC_Part1_{part}_Data' / f'{i}.jpg',
                  root / f'ISBI2016_ISIC_Part1_{part}_Data')
      shutil.copy(src / f'ISBI2016_ISIC_Part1_{part}_GroundTruth' / f'{i}_Segmentation.png',
                  root / f'ISBI2016_ISIC_Part1_{part}_GroundTruth')
  (root / 'ISBI2016_ISIC_Part3_Training_GroundTruth.csv').write_text(
      'ISIC_0000000,benign\nISIC_0000001,benign\nISIC_0000002,malignant\n')
  (root / 'ISBI2016_ISIC_Part3_Test_GroundTruth.csv').write_text(
      'ISIC_0000003,0.0\nISIC_0000012,1.0\n')
  return root


def _build(manual_dir, data_dir, name='isic2016'):
  return builders.prepare(name, str(manual_dir), str(data_dir), SIZE)


def test_small_copy_builds_from_folders_and_from_zips(small_isic2016, tmp_path):
  b = _build(small_isic2016, tmp_path / 'a')
  assert b.info.splits['train'].num_examples == 3
  # The same downloads as the official zip files (each holds its folder).
  zipped = tmp_path / 'zipped'
  zipped.mkdir()
  for d in small_isic2016.iterdir():
    if d.is_dir():
      with zipfile.ZipFile(zipped / f'{d.name}.zip', 'w') as z:
        for f in d.iterdir():
          z.write(f, f'{d.name}/{f.name}')
    else:
      shutil.copy(d, zipped)
  b2 = _build(zipped, tmp_path / 'b')
  src_a, src_b = b.as_data_source()['test'], b2.as_data_source()['test']
  for i in range(2):
    np.testing.assert_array_equal(src_a[i]['image'], src_b[i]['image'])
    np.testing.assert_array_equal(src_a[i]['mask'], src_b[i]['mask'])


def _assert_fails_cleanly(manual_dir, data_dir, match):
  with pytest.raises(DataError, match=match):
    _build(manual_dir, data_dir)
  # Nothing that a later run could take for a built dataset.
  builder = builders.get_builder('isic2016', str(data_dir), SIZE)
  assert not builder.is_prepared()
  leftovers = list(pathlib.Path(data_dir).rglob('*.array_record*'))
  assert not leftovers, leftovers


def test_missing_and_empty_directories(tmp_path):
  with pytest.raises(DataError, match='is not a directory'):
    _build(tmp_path / 'nope', tmp_path / 'data')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(DataError, match='is empty'):
    _build(tmp_path / 'empty', tmp_path / 'data')
  (tmp_path / 'other' / 'something').mkdir(parents=True)
  with pytest.raises(DataError, match='ISBI2016_ISIC_Part1_Training_Data'):
    _build(tmp_path / 'other', tmp_path / 'data')
  (tmp_path / 'e2' / 'ISBI2016_ISIC_Part1_Training_Data').mkdir(parents=True)
  with pytest.raises(DataError, match='is empty'):
    _build(tmp_path / 'e2', tmp_path / 'data')


def test_zip_without_the_expected_folder(small_isic2016, tmp_path):
  d = small_isic2016 / 'ISBI2016_ISIC_Part1_Training_Data'
  with zipfile.ZipFile(small_isic2016 / 'ISBI2016_ISIC_Part1_Training_Data.zip', 'w') as z:
    for f in d.iterdir():
      z.write(f, f'wrong_folder/{f.name}')
  shutil.rmtree(d)
  _assert_fails_cleanly(small_isic2016, tmp_path / 'data', 'does not contain the folder')


@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'empty'])
def test_unreadable_image_names_the_file(small_isic2016, tmp_path, damage):
  f = small_isic2016 / 'ISBI2016_ISIC_Part1_Test_Data' / 'ISIC_0000012.jpg'
  data = f.read_bytes()
  f.write_bytes({'truncated': data[:len(data) // 3], 'garbage': os.urandom(500),
                 'empty': b''}[damage])
  _assert_fails_cleanly(small_isic2016, tmp_path / 'data', 'ISIC_0000012.jpg')


def test_missing_mask(small_isic2016, tmp_path):
  os.remove(small_isic2016 / 'ISBI2016_ISIC_Part1_Training_GroundTruth' /
            'ISIC_0000001_Segmentation.png')
  _assert_fails_cleanly(small_isic2016, tmp_path / 'data', 'mask for ISIC_0000001 is missing')


@pytest.mark.parametrize('csv,match', [
    ('ISIC_0000000,benign\nISIC_0000001,maybe\nISIC_0000002,malignant\n', "row 2: unknown label 'maybe'"),
    ('ISIC_0000000,benign\nISIC_0000009,benign\n', 'lists ISIC_0000009'),
    ('ISIC_0000000,benign\nISIC_0000000,benign\n', 'row 2: duplicate ID ISIC_0000000'),
])
def test_bad_label_csv(small_isic2016, tmp_path, csv, match):
  (small_isic2016 / 'ISBI2016_ISIC_Part3_Training_GroundTruth.csv').write_text(csv)
  _assert_fails_cleanly(small_isic2016, tmp_path / 'data', match)


def test_ph2_sheet_with_moved_header(tmp_path, shared_data):
  import openpyxl
  root = tmp_path / 'ph2'
  shutil.copytree(shared_data / 'ph2_fixture', root)
  sheet = root / 'PH2Dataset' / 'PH2_dataset.xlsx'
  wb = openpyxl.load_workbook(sheet)
  wb.worksheets[0].delete_rows(1)           # the header is now on row 12
  wb.save(sheet)
  with pytest.raises(DataError, match='row 13'):
    _build(root, tmp_path / 'data', 'ph2')


def test_unprepared_dataset_without_manual_dir_says_what_to_do(tmp_path):
  with pytest.raises(DataError, match='manual_dir'):
    builders.prepare('isic2016', '', str(tmp_path), SIZE)


@pytest.mark.parametrize('paper_protocol', [False, True])
def test_mtl4_trains_on_the_shared_data_and_reports_both_test_sets(tmp_path, real_data_cfg,
                                                                   paper_protocol):
  import json
  r = run_main(
      tmp_path / 'run', f'--config.data.manual_dir={real_data_cfg.manual_dir}',
      f'--config.data.data_dir={real_data_cfg.data_dir}', f'--config.data.image_size={SIZE}',
      '--config.model.features=(4, 8, 8, 16)', '--config.model.cls_hidden=8',
      '--config.num_train_steps=3', '--config.eval_batch_size=50',
      f'--config.data.paper_protocol_train_on_test_images={paper_protocol}',
      config='configs/mtl4.py', timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  m = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
  assert m['isic2016_test']['n'] == 305 and m['ph2']['n'] == 4
  if paper_protocol:   # all 404 but the held-out validation images, 63 of them test images
    extra = m['extra_melanomas']
    assert extra['added'] + extra['dropped_in_validation'] == 404
    assert extra['in_eval_set_but_kept'] == 63 and m['trained_on_test_images'] is True
    assert m['trained_on_eval_images'] == {'isic2016_test': 63, 'ph2': 0}   # by identity
    return
  assert m['extra_melanomas']['added'] == 194
  assert m['train_examples'] + m['validation_examples'] == 749 + 194
  assert 'trained_on_test_images' not in m
  assert m['trained_on_eval_images'] == {'isic2016_test': 0, 'ph2': 0}


def test_mask_of_another_size_than_its_image_is_refused(small_isic2016, tmp_path):
  mask = small_isic2016 / 'ISBI2016_ISIC_Part1_Training_GroundTruth' / 'ISIC_0000001_Segmentation.png'
  from PIL import Image
  with Image.open(mask) as m:
    m.resize((m.width // 2, m.height)).save(mask)
  _assert_fails_cleanly(small_isic2016, tmp_path / 'data',
                        r'ISIC_0000001_Segmentation.png is 128x256 pixels, but its image .*'
                        r'ISIC_0000001.jpg is 256x256')


def test_a_killed_preparations_leftovers_are_removed_by_the_next(small_isic2016, tmp_path):
  data_dir = tmp_path / 'data'
  parent = pathlib.Path(builders.get_builder('isic2016', str(data_dir), SIZE).data_dir).parent
  leftover = parent / 'incomplete.A1B2C3.1.0.0'
  (leftover / 'isic2016-train.array_record-00000-of-00001').parent.mkdir(parents=True)
  (leftover / 'isic2016-train.array_record-00000-of-00001').write_bytes(b'\0' * 1000)
  b = _build(small_isic2016, data_dir)
  assert b.info.splits['train'].num_examples == 3
  assert not leftover.exists()
  assert not [p for p in parent.iterdir() if p.name.startswith('incomplete.')]


def test_symlinked_downloads_build(small_isic2016, tmp_path):
  manual = tmp_path / 'linked'
  manual.mkdir()
  (manual / 'isic2016').symlink_to(small_isic2016, target_is_directory=True)
  (manual / 'isic2016' / 'again').symlink_to(manual, target_is_directory=True)  # a loop
  b = _build(manual, tmp_path / 'data')
  assert b.info.splits['test'].num_examples == 2


def test_prepare_command_builds_and_reports_and_refuses_a_wrong_folder(tmp_path, shared_data):
  """`python -m skinmtl_jax.prepare`, as the README gives it: the PH2 fixture at 32x32, then a
  folder without the dataset (one line naming what is missing, nothing left behind)."""
  run = lambda *args: run_module('skinmtl_jax.prepare', '--dataset=ph2', f'--data_dir={tmp_path}',
                                 '--size=32x32', *args, timeout=300)
  r = run(f'--manual_dir={shared_data / "ph2_fixture"}')
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'ph2 test: 4 examples in' in r.stdout
  assert (tmp_path / 'ph2' / '32x32').is_dir()
  empty = tmp_path / 'empty'
  empty.mkdir()
  r = run(f'--manual_dir={empty}', f'--data_dir={tmp_path / "other"}')
  assert r.returncode != 0 and 'Traceback' not in r.stderr, r.stderr
  assert f'manual_dir {empty} is empty' in r.stderr.splitlines()[-1]
  assert not (tmp_path / 'other' / 'ph2' / '32x32').exists()


def test_a_test_image_copied_into_training_under_another_id_is_not_trained_on(small_isic2016,
                                                                               tmp_path):
  """Duplicates are caught by content, not only by ID: ISIC_0000003 (a test image) copied into
  training as ISIC_0009999 is left out of training, and named."""
  root = small_isic2016
  for part, suffix in (('Data', '.jpg'), ('GroundTruth', '_Segmentation.png')):
    folder = root / f'ISBI2016_ISIC_Part1_{{}}_{part}'
    shutil.copy(pathlib.Path(str(folder).format('Test')) / f'ISIC_0000003{suffix}',
                pathlib.Path(str(folder).format('Training')) / f'ISIC_0009999{suffix}')
  with open(root / 'ISBI2016_ISIC_Part3_Training_GroundTruth.csv', 'a', encoding='utf-8') as f:
    f.write('ISIC_0009999,benign\n')
  cfg = ml_collections.ConfigDict({
      'name': 'isic2016', 'manual_dir': str(root), 'image_size': SIZE,
      'data_dir': str(tmp_path / 'tfds'), 'extra_melanomas': '',
      'paper_protocol_train_on_test_images': False, 'eval_sets': ('isic2016_test',),
      'enlarge_benign': 4, 'enlarge_melanoma': 16, 'num_workers': 0,
      'validation_fraction': 0.0})
  train, _ = input_pipeline.train_and_validation(cfg)
  assert sorted(train.ids) == ['ISIC_0000000', 'ISIC_0000001', 'ISIC_0000002']
  assert train.info['training_copies_of_eval_images'] == ['ISIC_0009999']
  # The paper's protocol, asked for by name, keeps what the paper would have trained on.
  cfg.paper_protocol_train_on_test_images = True
  assert 'ISIC_0009999' in input_pipeline.train_and_validation(cfg)[0].ids
