"""grain input pipelines: enlargement by index expansion, per-epoch shuffling, batching.

Training: every source example is paired with each of its class's transform ids (the paper's
enlargement, §3.2), the pairs are shuffled anew each epoch from the seed, transformed, and
batched with the last partial batch dropped. Evaluation reads each example exactly once, in
order, the last partial batch included (padded to the batch size, with a validity mask, so the
eval step compiles once).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from skinmtl_jax import augment
from skinmtl_jax.config_base import ConfigError
from skinmtl_jax.datasets.synthetic import SyntheticLesions

REAL_DATASETS = {
    'isic2016': 'ISIC 2016 (https://challenge.isic-archive.com/data/#2016: Part 1 training and '
                'test images and ground truth, Part 3 training and test ground truth)',
    'isic2017': 'ISIC 2017 (https://challenge.isic-archive.com/data/#2017: training and '
                'validation data, Part 1 and Part 3 ground truth)',
    'ph2': 'PH2 (https://www.fc.up.pt/addi/ph2%20database.html, by request form)',
}


class DatasetUnavailableError(ConfigError):
  """The config names a dataset this version cannot read."""


@dataclasses.dataclass(frozen=True)
class Split:
  """A data source and the labels of its examples (labels are needed to plan enlargement)."""

  name: str
  source: Any  # random access: len() and [i] -> {'image', 'mask', 'label', 'id'}
  labels: np.ndarray


def _check_real_dataset(name: str, data_cfg: ml_collections.ConfigDict) -> None:
  raise DatasetUnavailableError(
      f'config data.name / data.eval_sets names {name!r}: reading the real datasets is not '
      f'implemented in this version yet (the TFDS builders are tracked as their own issue). '
      f'To prepare for it, download {REAL_DATASETS[name]} by hand into one folder and pass it '
      f'as --config.data.manual_dir=DIR (now: {data_cfg.get("manual_dir") or "unset"}). '
      f"Until then, train on the bundled data: --config=configs/demo.py or "
      f"--config.data.name=synthetic --config.data.eval_sets=\"('test',)\".")


def get_split(data_cfg: ml_collections.ConfigDict, split: str) -> Split:
  """The split `split` ('train', 'test' or a real eval set name) of the configured data."""
  if data_cfg.name == 'synthetic':
    syn = data_cfg.synthetic
    n = syn.num_train if split == 'train' else syn.num_test
    source = SyntheticLesions(split, n, tuple(data_cfg.image_size), syn.melanoma_fraction,
                              syn.seed)
    # Drawn once and kept in memory: re-drawing every epoch would cost more than a small
    # model's train step (1000 examples at 192x256 take about 0.6 GB).
    examples = [source[i] for i in range(len(source))]
    return Split(f'synthetic_{split}', examples, np.array([e['label'] for e in examples]))
  name = data_cfg.name if split == 'train' else split.split('_')[0]
  if name in REAL_DATASETS:
    _check_real_dataset(name, data_cfg)
  raise ConfigError(f'data.name={data_cfg.name!r} is unknown; expected "synthetic" or one of '
                   f'{sorted(REAL_DATASETS)}.')


def enlarged_index(labels: np.ndarray, multiplicities: Sequence[int]) -> np.ndarray:
  """(example, transform id) pairs of the enlarged training set, shape (N_enlarged, 2).

  Args:
    labels: class of each example.
    multiplicities: multiplicities[c] transforms for class c (paper: benign 4, melanoma 16).
  """
  ids = [augment.transform_ids(m) for m in multiplicities]
  pairs = [(i, t) for i, c in enumerate(np.asarray(labels)) for t in ids[int(c)]]
  return np.asarray(pairs, np.int64).reshape(-1, 2)


def _stack(examples: Sequence[dict]) -> dict:
  return {k: np.stack([e[k] for e in examples]) for k in ('image', 'mask', 'label')}


class _LoadAndTransform(grain.transforms.Map):

  def __init__(self, source):
    self._source = source

  def map(self, pair):
    ex = self._source[int(pair[0])]
    image, mask = augment.apply_transform(ex['image'], ex['mask'], int(pair[1]))
    return {'image': image, 'mask': mask, 'label': ex['label']}


def train_dataset(split: Split, data_cfg: ml_collections.ConfigDict, *, batch_size: int,
                  seed: int) -> tuple[grain.IterDataset, int]:
  """The training pipeline. Returns (dataset of batches, enlarged examples per epoch)."""
  pairs = enlarged_index(split.labels, (data_cfg.enlarge_benign, data_cfg.enlarge_melanoma))
  if len(pairs) < batch_size:
    raise ConfigError(f'{split.name}: {len(pairs)} enlarged examples are fewer than one batch '
                     f'(batch_size={batch_size}).')
  ds = (grain.MapDataset.source(pairs).seed(seed).shuffle().repeat(None)
        .map(_LoadAndTransform(split.source))
        .batch(batch_size, drop_remainder=True, batch_fn=_stack))
  it = ds.to_iter_dataset()
  if data_cfg.num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
  return it, len(pairs)


def eval_batches(split: Split, batch_size: int):
  """Yields (batch, ids) over `split` in order, every example once.

  The last partial batch is padded by repeating its last example; batch['valid'] marks the
  real rows, so that one compiled eval step serves every batch.
  """
  ds = grain.MapDataset.source(split.source).batch(batch_size, drop_remainder=False,
                                                    batch_fn=lambda exs: exs)
  for examples in ds:
    examples = list(examples)
    ids = [str(e['id']) for e in examples]
    valid = np.zeros(batch_size, bool)
    valid[:len(examples)] = True
    batch = _stack(examples + [examples[-1]] * (batch_size - len(examples)))
    batch['valid'] = valid
    yield batch, ids
