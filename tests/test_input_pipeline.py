"""The bundled synthetic data and the grain pipelines."""

import numpy as np
import pytest

from conftest import tiny_config
from skinmtl_jax import input_pipeline
from skinmtl_jax.config_base import ConfigError
from skinmtl_jax.datasets.files import DataError
from skinmtl_jax.datasets.synthetic import SyntheticLesions


def test_synthetic_is_deterministic_and_well_formed():
  a = SyntheticLesions('train', 20, (48, 64), seed=3)
  b = SyntheticLesions('train', 20, (48, 64), seed=3)
  for i in (0, 7, 19):
    ea, eb = a[i], b[i]
    np.testing.assert_array_equal(ea['image'], eb['image'])
    assert ea['image'].shape == (48, 64, 3) and ea['image'].dtype == np.uint8
    assert ea['image'].max() > 100
    assert set(np.unique(ea['mask'])) == {0, 1}
  with pytest.raises(IndexError):
    a[20]


def test_splits_and_seeds_differ():
  train = SyntheticLesions('train', 5, (32, 32))
  test = SyntheticLesions('test', 5, (32, 32))
  other = SyntheticLesions('train', 5, (32, 32), seed=1)
  assert not np.array_equal(train[0]['image'], test[0]['image'])
  assert not np.array_equal(train[0]['image'], other[0]['image'])


def test_melanoma_fraction_and_lesion_sizes():
  ds = SyntheticLesions('train', 400, (32, 48), melanoma_fraction=0.3)
  labels = np.array([ds.label(i) for i in range(len(ds))])
  assert 0.24 < labels.mean() < 0.36
  areas = np.array([ds[i]['mask'].mean() for i in range(60)])
  assert areas.min() > 0.02 and areas.max() < 0.8   # a lesion, never the whole picture


def test_eval_batches_read_every_example_once_with_padding():
  cfg = tiny_config()
  split = input_pipeline.get_split(cfg.data, 'test')          # 12 examples
  seen, valid_rows = [], 0
  for batch, ids in input_pipeline.eval_batches(split, 5):    # 5 + 5 + 2 (padded to 5)
    assert batch['image'].shape[0] == 5
    valid_rows += int(batch['valid'].sum())
    seen += ids
  assert seen == [f'synthetic_test_{i:06d}' for i in range(12)]
  assert valid_rows == 12


def test_train_pipeline_enlarges_shuffles_per_epoch_and_restores():
  cfg = tiny_config()
  split = input_pipeline.get_split(cfg.data, 'train')
  ds, per_epoch = input_pipeline.train_dataset(split, cfg.data, batch_size=4, seed=0)
  labels = split.labels
  assert per_epoch == int(np.sum(np.where(labels == 1, 2, 1)))   # tiny: benign 1, melanoma 2
  it = iter(ds)
  steps_per_epoch = per_epoch // 4
  epoch1 = [next(it) for _ in range(steps_per_epoch)]
  epoch2 = [next(it) for _ in range(steps_per_epoch)]
  assert not all(np.array_equal(a['label'], b['label']) and np.array_equal(a['image'], b['image'])
                 for a, b in zip(epoch1, epoch2))
  # The iterator's state restores the position exactly.
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  it2 = iter(ds)
  it2.set_state(state)
  for e in expected:
    got = next(it2)
    np.testing.assert_array_equal(got['image'], e['image'])
    np.testing.assert_array_equal(got['mask'], e['mask'])


def test_unknown_data_and_unprepared_real_data_stop_with_instructions(tmp_path):
  cfg = tiny_config()
  cfg.data.name = 'imagenet'
  with pytest.raises(ConfigError, match='data.name'):
    input_pipeline.get_split(cfg.data, 'train')
  with pytest.raises(ConfigError, match='data.eval_sets'):
    input_pipeline.get_split(cfg.data, 'isic2019_test')
  cfg.data.name = 'isic2016'
  cfg.data.data_dir = str(tmp_path)
  with pytest.raises(DataError, match='manual_dir'):
    input_pipeline.get_split(cfg.data, 'train')
