"""The data's splits, loaded, and the grain pipelines: enlargement by index expansion,
per-epoch shuffling, batching. Which image goes into which split is skinmtl_jax/splits.py's.

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

from collections.abc import Sequence

import grain
import ml_collections
import numpy as np

from skinmtl_jax import splits
from skinmtl_jax.config_base import ConfigError
from skinmtl_jax.datasets import builders
from skinmtl_jax.datasets.synthetic import SyntheticLesions
from skinmtl_jax.splits import Split

REAL_DATASETS = ('isic2016', 'isic2017', 'ph2')
# Eval set names in configs -> (dataset, split).
EVAL_SETS = {'isic2016_test': ('isic2016', 'test'), 'ph2': ('ph2', 'test'),
             'isic2017_validation': ('isic2017', 'validation')}


class DatasetUnavailableError(ConfigError):
  """The config names a dataset or split that does not exist."""


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


def _real_split(name: str, dataset: str, split: str, data_cfg) -> Split:
  source = TfdsSource(builders.load(dataset, split, data_cfg))
  examples = [source[i] for i in range(len(source))]
  return Split(name, source, np.array([e['label'] for e in examples], np.int32),
               tuple(e['id'] for e in examples), digests=tuple(splits.digest(e['image'])
                                                              for e in examples))


def _synthetic_split(data_cfg, split: str) -> Split:
  """The synthetic 'train' or 'test' split, drawn once and kept in memory: re-drawing every
  epoch would cost more than a small model's train step."""
  syn = data_cfg.synthetic
  count = syn.num_train if split == 'train' else syn.num_test
  source = SyntheticLesions(split, count, tuple(data_cfg.image_size), syn.melanoma_fraction,
                            syn.seed)
  examples = [source[i] for i in range(len(source))]
  return Split(f'synthetic_{split}', examples, np.array([e['label'] for e in examples]),
               tuple(e['id'] for e in examples))


def _full_train(data_cfg) -> Split:
  """The whole training split of the configured data, before validation is held out."""
  if data_cfg.name == 'synthetic':
    return _synthetic_split(data_cfg, 'train')
  if data_cfg.name not in ('isic2016',):
    raise DatasetUnavailableError(
        f'data.name={data_cfg.name!r}: training data must be "synthetic" or "isic2016".')
  return _real_split('isic2016_train', 'isic2016', 'train', data_cfg)


def train_and_validation(data_cfg: ml_collections.ConfigDict) -> tuple[Split, Split | None]:
  """The training split and the validation split held out of it (None when
  data.validation_fraction is 0), made together so the training data is read once; the
  protocol (which image goes where) is skinmtl_jax/splits.py's.
  """
  full, known_ids, protected = _training_images(data_cfg)
  train, validation = splits.hold_out(full, float(data_cfg.validation_fraction))
  if protected is not None and data_cfg.extra_melanomas:
    if data_cfg.extra_melanomas != 'isic2017':
      raise DatasetUnavailableError(
          f'data.extra_melanomas={data_cfg.extra_melanomas!r}: only "isic2017" is known.')
    extras = [_real_split(f'isic2017_{s}', 'isic2017', s, data_cfg)
              for s in ('train', 'validation')]
    try:
      train = splits.with_extra_melanomas(
          train, extras, protected, known_ids=known_ids,
          paper=bool(data_cfg.paper_protocol_train_on_test_images),
          control=bool(data_cfg.paper_protocol_matched_control))
    except ValueError as e:
      raise DatasetUnavailableError(str(e)) from e
  return train, validation


def _training_images(data_cfg) -> tuple[Split, set[str], splits.Protected | None]:
  """(the training split before the validation hold-out, less copies of protected images;
  every ID it had; the protected images, None for synthetic data)."""
  full = _full_train(data_cfg)
  known_ids = set(full.ids)
  if data_cfg.name == 'synthetic':
    return full, known_ids, None
  protected = splits.Protected.of({name: get_split(data_cfg, name)
                                   for name in splits.protected_sets(data_cfg.eval_sets)})
  if not data_cfg.paper_protocol_train_on_test_images:
    full = splits.without_copies(full, protected)
  return full, known_ids, protected


def validation_split(data_cfg: ml_collections.ConfigDict) -> Split | None:
  """Only the validation split (None when data.validation_fraction is 0): what evaluation
  needs to fit the calibration again, without reading mtl4's extra melanomas."""
  if float(data_cfg.validation_fraction) <= 0:
    return None
  return splits.hold_out(_training_images(data_cfg)[0],
                         float(data_cfg.validation_fraction))[1]


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
    return _synthetic_split(data_cfg, split)
  if split not in EVAL_SETS:
    raise DatasetUnavailableError(
        f'data.eval_sets names {split!r}; expected some of {sorted(EVAL_SETS)}.')
  return _real_split(split, *EVAL_SETS[split], data_cfg)


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
  pairs = splits.enlarged_index(split.labels,
                                (data_cfg.enlarge_benign, data_cfg.enlarge_melanoma))
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
