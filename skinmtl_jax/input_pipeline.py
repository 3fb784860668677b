"""grain input pipelines: enlargement by index expansion, per-epoch shuffling, batching.

Images travel as uint8 (H, W, 3) and become float32 in [0, 1] inside the jitted step: a
quarter of the bytes to move between worker processes and to the device.

Training: every source example is paired with each of its class's transform ids (the paper's
enlargement, §3.2), the pairs are shuffled anew each epoch from the seed and batched with the
last partial batch dropped. A batch carries the examples (or, for data resident on the device,
their indices) and their transform ids: the transforms run inside the jitted step
(`device_input.expand`, `augment.transform`), not here. Evaluation reads each example exactly once, in
order, the last partial batch included (padded to the batch size, with a validity mask, so the
eval step compiles once).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from absl import logging
import grain
import ml_collections
import numpy as np

from skinmtl_jax import augment
from skinmtl_jax.config_base import ConfigError
from skinmtl_jax.datasets import builders
from skinmtl_jax.datasets.synthetic import SyntheticLesions

REAL_DATASETS = ('isic2016', 'isic2017', 'ph2')
# Eval set names in configs -> (dataset, split).
EVAL_SETS = {'isic2016_test': ('isic2016', 'test'), 'ph2': ('ph2', 'test'),
             'isic2017_validation': ('isic2017', 'validation')}


class DatasetUnavailableError(ConfigError):
  """The config names a dataset or split that does not exist."""


@dataclasses.dataclass(frozen=True)
class Split:
  """A data source and the labels of its examples (labels are needed to plan enlargement).

  `info` records where the examples came from (for metrics.json), e.g. mtl4's extra melanomas.
  """

  name: str
  source: Any  # random access: len() and [i] -> {'image', 'mask', 'label', 'id'}
  labels: np.ndarray
  ids: tuple[str, ...] = ()
  info: dict = dataclasses.field(default_factory=dict)
  digests: tuple[str, ...] = ()  # SHA-256 of each stored image (real data): copies by content


class TfdsSource:
  """A TFDS data source (uint8 images, bytes IDs), optionally a subset, as pipeline examples."""

  def __init__(self, source, indices: Sequence[int] | None = None):
    self._source = source
    self._indices = None if indices is None else np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self._source) if self._indices is None else len(self._indices)

  def __getitem__(self, i: int) -> dict:
    record = self._source[int(i if self._indices is None else self._indices[i])]
    image_id = record['id']
    return {'image': np.asarray(record['image'], np.uint8),
            'mask': np.asarray(record['mask'], np.uint8),
            'label': np.int32(record['label']),
            'id': image_id.decode() if isinstance(image_id, bytes) else str(image_id)}


class ConcatSource:
  """Several random-access sources one after another."""

  def __init__(self, sources: Sequence[Any]):
    self._sources = list(sources)
    self._ends = np.cumsum([len(s) for s in self._sources])

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def __getitem__(self, i: int) -> dict:
    k = int(np.searchsorted(self._ends, i, side='right'))
    return self._sources[k][i - (int(self._ends[k - 1]) if k else 0)]


def _digest(image: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def _real_split(name: str, dataset: str, split: str, data_cfg) -> Split:
  source = TfdsSource(builders.load(dataset, split, data_cfg))
  examples = [source[i] for i in range(len(source))]
  return Split(name, source, np.array([e['label'] for e in examples], np.int32),
               tuple(e['id'] for e in examples), digests=tuple(_digest(e['image'])
                                                              for e in examples))


class SubsetSource:
  """The examples `indices` of a random-access source, in that order."""

  def __init__(self, source, indices: Sequence[int]):
    self._source = source
    self._indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int) -> dict:
    return self._source[int(self._indices[i])]


def _subset(split: Split, name: str, indices: Sequence[int], info: dict | None = None) -> Split:
  indices = np.asarray(indices, np.int64)
  source = ([split.source[int(i)] for i in indices] if isinstance(split.source, list)
            else SubsetSource(split.source, indices))
  return Split(name, source, np.asarray(split.labels)[indices],
               tuple(split.ids[int(i)] for i in indices), info or {},
               tuple(split.digests[int(i)] for i in indices) if split.digests else ())


def validation_indices(ids: Sequence[str], labels: np.ndarray, fraction: float) -> np.ndarray:
  """Which examples of a training split are held out for validation (sorted indices).

  Stratified: of each class, round(fraction x its count) examples (at least one when the
  fraction is positive and the class has two or more), so the held-out part keeps the
  training data's natural class balance. Chosen by ISIC ID (the examples whose SHA-256 of the
  ID sorts first), so an image's place depends on its ID alone, not on the order or on other
  images; no enlargement applies to it.
  """
  labels = np.asarray(labels)
  if fraction <= 0:
    return np.zeros(0, np.int64)
  keep = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    n = int(round(fraction * len(members)))
    if len(members) >= 2:
      n = min(max(n, 1), len(members) - 1)
    keep += sorted(members.tolist(), key=lambda i: _id_order(ids[i]))[:n]
  return np.asarray(sorted(keep), np.int64)


def _hold_out(full: Split, data_cfg) -> tuple[Split, Split | None]:
  """(training part, validation part or None) of the training split `full`."""
  fraction = float(data_cfg.get('validation_fraction', 0.0))
  held = validation_indices(full.ids, full.labels, fraction)
  if not len(held):
    return full, None
  rest = np.setdiff1d(np.arange(len(full.labels)), held)
  info = {'validation_fraction': fraction, 'validation_examples': len(held),
          'validation_melanomas': int(np.sum(np.asarray(full.labels)[held] == 1))}
  return (_subset(full, full.name, rest, {**full.info, **info}),
          _subset(full, f'{full.name}_validation', held))


def _full_train(data_cfg) -> Split:
  """The whole training split of the configured data, before validation is held out."""
  if data_cfg.name == 'synthetic':
    syn = data_cfg.synthetic
    source = SyntheticLesions('train', syn.num_train, tuple(data_cfg.image_size),
                              syn.melanoma_fraction, syn.seed)
    # Drawn once and kept in memory: re-drawing every epoch would cost more than a small
    # model's train step (1000 examples at 192x256 take about 0.6 GB).
    examples = [source[i] for i in range(len(source))]
    return Split('synthetic_train', examples, np.array([e['label'] for e in examples]),
                 tuple(e['id'] for e in examples))
  if data_cfg.name not in ('isic2016',):
    raise DatasetUnavailableError(
        f'data.name={data_cfg.name!r}: training data must be "synthetic" or "isic2016".')
  return _real_split('isic2016_train', 'isic2016', 'train', data_cfg)


def train_and_validation(data_cfg: ml_collections.ConfigDict) -> tuple[Split, Split | None]:
  """The training split and the validation split held out of it (None when
  data.validation_fraction is 0), made together so the training data is read once.

  The validation split comes from the ISIC 2016 (or synthetic) training images only, at their
  natural class balance: never from an evaluation set, never from mtl4's extra melanomas (and
  an extra melanoma that is a validation image is not added to training).
  """
  full, known_ids, protected = _training_images(data_cfg)
  train, validation = _hold_out(full, data_cfg)
  if protected is not None and data_cfg.extra_melanomas:
    train = _with_extra_melanomas(train, data_cfg, protected, known_ids=known_ids)
  return train, validation


def _training_images(data_cfg) -> tuple[Split, set[str], '_Protected | None']:
  """(the training split before the validation hold-out, less copies of protected images;
  every ID it had; the protected images, None for synthetic data)."""
  full = _full_train(data_cfg)
  known_ids = set(full.ids)
  if data_cfg.name == 'synthetic':
    return full, known_ids, None
  protected = _protected(data_cfg)
  if not data_cfg.paper_protocol_train_on_test_images:
    full = _without_copies(full, protected)
  return full, known_ids, protected


@dataclasses.dataclass(frozen=True)
class _Protected:
  """The images never trained on (but under the paper's protocol): PROTECTED_SETS and the
  evaluation sets, by ID and by content."""
  sets: tuple[str, ...]
  ids: frozenset
  digests: frozenset


def _protected(data_cfg) -> _Protected:
  sets = tuple(dict.fromkeys((*PROTECTED_SETS, *data_cfg.eval_sets)))
  splits = [get_split(data_cfg, name) for name in sets]
  return _Protected(sets, frozenset(i for s in splits for i in s.ids),
                    frozenset(d for s in splits for d in s.digests))


def _without_copies(full: Split, protected: _Protected) -> Split:
  """`full` less the images whose stored pixels are those of a protected image (a test image
  copied into training under another ID), with a warning naming them."""
  copies = [i for i, d in enumerate(full.digests) if d in protected.digests]
  if not copies:
    return full
  logging.warning('%d training images are copies of images of %s (the same pixels under another '
                  'ID): %s. They are not trained on (training_copies_of_eval_images in '
                  'metrics.json).', len(copies), ', '.join(protected.sets),
                  ', '.join(full.ids[i] for i in copies[:10]))
  keep = np.setdiff1d(np.arange(len(full.labels)), copies)
  return _subset(full, full.name, keep, {**full.info, 'training_copies_of_eval_images':
                                         [full.ids[i] for i in copies]})


def validation_split(data_cfg: ml_collections.ConfigDict) -> Split | None:
  """Only the validation split (None when data.validation_fraction is 0): what evaluation
  needs to fit the calibration again, without reading mtl4's extra melanomas."""
  if float(data_cfg.get('validation_fraction', 0.0)) <= 0:
    return None
  return _hold_out(_training_images(data_cfg)[0], data_cfg)[1]


def get_split(data_cfg: ml_collections.ConfigDict, split: str) -> Split:
  """The split `split` ('train'; 'validation', held out of the training data; or an eval set
  name: 'test' for synthetic data, 'isic2016_test', 'ph2', 'isic2017_validation') of the
  configured data.

  'train' excludes the validation examples (data.validation_fraction); for it, mtl4's extra
  ISIC 2017 melanomas are added when data.extra_melanomas names them.
  """
  if split in ('train', 'validation'):
    train, validation = train_and_validation(data_cfg)
    if split == 'train':
      return train
    if validation is None:
      raise DatasetUnavailableError('The validation split is empty: data.validation_fraction '
                                    'is 0.')
    return validation
  if data_cfg.name == 'synthetic':
    if split != 'test':
      raise DatasetUnavailableError(f'data.eval_sets names {split!r}; synthetic data has "test".')
    syn = data_cfg.synthetic
    source = SyntheticLesions(split, syn.num_test, tuple(data_cfg.image_size),
                              syn.melanoma_fraction, syn.seed)
    examples = [source[i] for i in range(len(source))]
    return Split(f'synthetic_{split}', examples, np.array([e['label'] for e in examples]),
                 tuple(e['id'] for e in examples))
  if split not in EVAL_SETS:
    raise DatasetUnavailableError(
        f'data.eval_sets names {split!r}; expected some of {sorted(EVAL_SETS)}.')
  return _real_split(split, *EVAL_SETS[split], data_cfg)


# Never trained on (except under data.paper_protocol_train_on_test_images), whatever
# data.eval_sets holds: the official test set of ISIC 2016. (ISIC 2017's test set and PH2 are
# never read for training at all: mtl4's extra melanomas come from ISIC 2017 train and
# validation.)
PROTECTED_SETS = ('isic2016_test',)


def _id_order(image_id: str) -> str:
  """The order in which images are chosen by ID: the SHA-256 of the ID (independent of the
  others and of file order)."""
  return hashlib.sha256(str(image_id).encode()).hexdigest()


def _with_extra_melanomas(train: Split, data_cfg, protected: _Protected,
                          known_ids: set[str] | None = None) -> Split:
  """ISIC 2016 training plus the ISIC 2017 train + validation melanomas (mtl4), minus every
  image of ISIC 2016's test set or of an evaluation set (by ISIC ID) and every image already in
  ISIC 2016 training (`known_ids`: all of it, the held-out validation images included).

  data.paper_protocol_train_on_test_images restores the paper's all-404 protocol (which still
  keeps the validation images out). data.paper_protocol_matched_control is its control: the
  paper protocol's list, in its order, with each test or evaluation image replaced by one of
  the melanomas the leak-free list adds (chosen in ID-hash order, cycled): the same number of
  extra melanomas (so the same steps and melanoma share) and no test image.
  """
  if data_cfg.extra_melanomas != 'isic2017':
    raise DatasetUnavailableError(
        f'data.extra_melanomas={data_cfg.extra_melanomas!r}: only "isic2017" is known.')
  paper = bool(data_cfg.paper_protocol_train_on_test_images)
  control = bool(data_cfg.get('paper_protocol_matched_control', False))
  protected_sets, eval_ids = protected.sets, protected.ids
  train_ids = set(train.ids) if known_ids is None else set(known_ids)
  held_out = train_ids - set(train.ids)  # the validation images: never trained on
  info = {'available': 0, 'added': 0, 'dropped_in_eval_set': 0, 'dropped_already_in_train': 0,
          'dropped_in_validation': 0, 'in_eval_set_but_kept': 0,
          'paper_protocol_train_on_test_images': paper, 'protected_sets': list(protected_sets)}
  if control:
    info.update(paper_protocol_matched_control=True, replaced_eval_images=0)
  extras = [_real_split(f'isic2017_{split}', 'isic2017', split, data_cfg)
            for split in ('train', 'validation')]
  ids = [i for e in extras for i in e.ids]
  digests = [d for e in extras for d in e.digests]
  labels = np.concatenate([e.labels for e in extras])
  keep, replace = [], []  # indices into `ids`; positions in `keep` to replace (control)
  for i, (image_id, label) in enumerate(zip(ids, labels)):
    if label != 1:
      continue
    info['available'] += 1
    if not paper and (image_id in eval_ids or digests[i] in protected.digests):
      info['dropped_in_eval_set'] += 1
      if control:
        replace.append(len(keep))
        keep.append(-1)
      continue
    if image_id in held_out:
      info['dropped_in_validation'] += 1
      continue
    if not paper and not control and image_id in train_ids:
      info['dropped_already_in_train'] += 1
      continue
    info['in_eval_set_but_kept'] += int(image_id in eval_ids)
    keep.append(i)
  if replace:
    pool = sorted((i for i in keep if i >= 0 and ids[i] not in train_ids),
                  key=lambda i: _id_order(ids[i]))
    if not pool:
      raise DatasetUnavailableError(
          'data.paper_protocol_matched_control: no ISIC 2017 melanoma outside ISIC 2016 and '
          'the evaluation sets is left to stand in for the test images.')
    for j, position in enumerate(replace):
      keep[position] = pool[j % len(pool)]
    info['replaced_eval_images'] = len(replace)
  info['added'] = len(keep)
  if paper:
    logging.warning('!' * 78)
    logging.warning('data.paper_protocol_train_on_test_images=True: training on %d ISIC 2017 '
                    'melanomas, %d of them images of the evaluation sets. Results are NOT a '
                    'fair test.', info['added'], info['in_eval_set_but_kept'])
    logging.warning('!' * 78)
  logging.info('Extra melanomas from ISIC 2017: %s', info)
  source = SubsetSource(ConcatSource([e.source for e in extras]), keep)
  return Split('isic2016_train+isic2017_melanomas', ConcatSource([train.source, source]),
               np.concatenate([train.labels, labels[keep]]),
               tuple(train.ids) + tuple(ids[i] for i in keep),
               {**train.info, 'extra_melanomas': info},
               tuple(train.digests) + tuple(digests[i] for i in keep))


def training_set_record(train: Split, validation: Split | None, data_cfg) -> dict[str, Any]:
  """What a run trains on, by identity (workdir/training_set.json): every training example's
  ID and label in the pipeline's order, the transforms per class, the held-out validation IDs,
  and their SHA-256. A resume whose record differs is refused (workdir.check_training_set)."""
  record = {'examples': [[str(i), int(l)] for i, l in zip(train.ids, train.labels)],
            'transforms': {'benign': int(data_cfg.enlarge_benign),
                           'melanoma': int(data_cfg.enlarge_melanoma)},
            'validation': sorted(validation.ids) if validation is not None else []}
  record['sha256'] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
  return record


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


class _LoadBatch(grain.transforms.Map):
  """(batch_size, 2) (example, transform) pairs -> the rows `rows` of the batch: the examples'
  uint8 images, masks and labels, and their transform ids (applied in the step)."""

  def __init__(self, source, rows: slice):
    self._source = source
    self._rows = rows

  def map(self, pairs):
    pairs = pairs[self._rows]
    batch = _stack([self._source[int(example)] for example in pairs[:, 0]])
    batch['transform'] = pairs[:, 1].astype(np.int32)
    return batch


class _IndexBatch(grain.transforms.Map):
  """(batch_size, 2) pairs -> the rows `rows` as {'index', 'transform'}: for training data that
  is resident on the device (data.on_device), where the step gathers the examples."""

  def __init__(self, rows: slice):
    self._rows = rows

  def map(self, pairs):
    pairs = pairs[self._rows]
    return {'index': pairs[:, 0].astype(np.int32), 'transform': pairs[:, 1].astype(np.int32)}


def train_dataset(split: Split, data_cfg: ml_collections.ConfigDict, *, batch_size: int,
                  seed: int, rows: slice = slice(None), resident: bool = False,
                  start: int = 0) -> tuple[grain.IterDataset, int]:
  """The training pipeline from batch `start` on. Returns (dataset of batches, enlarged
  examples per epoch).

  Batches are drawn as (example, transform) pairs from the shuffled, enlarged index; only the
  rows `rows` of each are loaded (a process of a multi-host run loads the rows its devices
  hold), so every process walks the same global order. A batch is {'image' (B, H, W, 3) uint8,
  'mask', 'label', 'transform' (B,)}, or, when the split is `resident` on the device,
  {'index' (B,), 'transform' (B,)}; `device_input.expand` makes the step's batch of either.

  Batch k is a function of the seed, the split and k alone (grain's MapDataset is random
  access), so a run that resumes after s steps starts at batch s: its position needs no state
  of its own, and survives a change of data.num_workers or data.on_device.
  """
  pairs = enlarged_index(split.labels, (data_cfg.enlarge_benign, data_cfg.enlarge_melanoma))
  if len(pairs) < batch_size:
    raise ConfigError(f'{split.name}: {len(pairs)} enlarged examples are fewer than one batch '
                     f'(batch_size={batch_size}).')
  load = _IndexBatch(rows) if resident else _LoadBatch(split.source, rows)
  ds = (grain.MapDataset.source(pairs).seed(seed).shuffle().repeat(None)
        .batch(batch_size, drop_remainder=True, batch_fn=np.stack))
  if start:
    ds = ds[start:]
  it = ds.map(load).to_iter_dataset()
  if data_cfg.num_workers > 0 and not resident:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
  return it, len(pairs)


def stacked_examples(split: Split) -> dict[str, np.ndarray]:
  """Every example of `split` as arrays {'image' (N, H, W, 3) uint8, 'mask', 'label'}: what
  data.on_device places on the device."""
  return _stack([split.source[i] for i in range(len(split.source))])


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
