"""Which images go where: the data protocol, on IDs, labels and pixel digests (no file I/O).

input_pipeline loads the datasets and hands their splits to these functions; everything that
decides which image is trained on, held out, enlarged, calibrated on or evaluated on is here,
so that it can be tested by identity on hand-made splits (tests/test_splits.py). The promises
the README and docs/ make, each with the test that fails when it is broken:

 1. The validation split (data.validation_fraction) is stratified by class: of each class,
    round(fraction x its count) images, at least one of a class of two or more
    (test_validation_split_is_stratified_by_class).
 2. It is chosen by the SHA-256 of the ISIC ID: the same images whatever their order
    (test_validation_images_are_chosen_by_id_not_by_order).
 3. It is taken from ISIC 2016 (or synthetic) training only, never from an evaluation set or
    mtl4's extra melanomas (test_validation_comes_from_the_training_images_only).
 4. It is never trained on and never enlarged, an extra ISIC 2017 melanoma that is a validation
    image included (test_validation_images_are_never_trained_on_nor_enlarged).
 5. No image of ISIC 2016's test set or of an evaluation set is trained on, whatever
    data.eval_sets holds, by ID (mtl4's extra melanomas) and by content (a copy under another
    ID) (test_no_evaluation_image_is_trained_on_by_id_or_by_content).
 6. Leak-free mtl4 adds no ISIC 2016 training duplicate, and records every count
    (test_leak_free_extra_melanomas_drop_duplicates_and_count_them).
 7. The paper's protocol (data.paper_protocol_train_on_test_images) adds every ISIC 2017
    melanoma but the validation images; its matched control (data.paper_protocol_matched_
    control) is that list, position by position, with each test image replaced by a leak-free
    one (test_the_paper_protocol_and_its_matched_control).
 8. Benign images are enlarged by the 4 right-angle rotations and melanomas by all 16
    transforms, on the training split only (test_enlargement_is_4x_benign_16x_melanoma).
 9. The calibration is fitted on the validation split only, for the model it is applied to
    (test_the_calibration_is_fitted_on_the_validation_images_only in tests/test_splits.py;
    its model tie in tests/test_robustness.py).
10. Evaluation sets are never shuffled, dropped or enlarged: every image is scored once, in
    order (test_every_evaluation_image_is_scored_once_in_order).
11. A resume on other training examples is refused by name (training_set_record;
    tests/test_robustness.py::test_a_resume_on_other_training_examples_is_refused_by_name).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from absl import logging
import numpy as np

from skinmtl_jax import augment

# Never trained on (except under data.paper_protocol_train_on_test_images), whatever
# data.eval_sets holds: the official test set of ISIC 2016. (ISIC 2017's test set and PH2 are
# never read for training at all: mtl4's extra melanomas come from ISIC 2017 train and
# validation.)
PROTECTED_SETS = ('isic2016_test',)


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


class SubsetSource:
  """The examples `indices` of a random-access source, in that order."""

  def __init__(self, source, indices: Sequence[int]):
    self._source = source
    self._indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int) -> dict:
    return self._source[int(self._indices[i])]


def digest(image: np.ndarray) -> str:
  """SHA-256 of an image's stored pixels: two images with the same digest are copies."""
  return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def id_order(image_id: str) -> str:
  """The order in which images are chosen by ID: the SHA-256 of the ID (independent of the
  others and of file order)."""
  return hashlib.sha256(str(image_id).encode()).hexdigest()


def subset(split: Split, name: str, indices: Sequence[int], info: dict | None = None) -> Split:
  """The examples `indices` of `split`, in that order, as a split called `name`."""
  indices = np.asarray(indices, np.int64)
  source = ([split.source[int(i)] for i in indices] if isinstance(split.source, list)
            else SubsetSource(split.source, indices))
  return Split(name, source, np.asarray(split.labels)[indices],
               tuple(split.ids[int(i)] for i in indices), info or {},
               tuple(split.digests[int(i)] for i in indices) if split.digests else ())


# ------------------------------------------------------------------------ the validation split

def validation_indices(ids: Sequence[str], labels: np.ndarray, fraction: float) -> np.ndarray:
  """Which examples of a training split are held out for validation (sorted indices).

  Stratified: of each class, round(fraction x its count) examples (at least one when the
  fraction is positive and the class has two or more), so the held-out part keeps the
  training data's natural class balance. Chosen by ISIC ID (the examples whose SHA-256 of the
  ID sorts first), so an image's place depends on its ID, not on the order; no enlargement
  applies to it.
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
    keep += sorted(members.tolist(), key=lambda i: id_order(ids[i]))[:n]
  return np.asarray(sorted(keep), np.int64)


def hold_out(full: Split, fraction: float) -> tuple[Split, Split | None]:
  """(training part, validation part or None) of the training split `full`."""
  held = validation_indices(full.ids, full.labels, fraction)
  if not len(held):
    return full, None
  rest = np.setdiff1d(np.arange(len(full.labels)), held)
  info = {'validation_fraction': fraction, 'validation_examples': len(held),
          'validation_melanomas': int(np.sum(np.asarray(full.labels)[held] == 1))}
  return (subset(full, full.name, rest, {**full.info, **info}),
          subset(full, f'{full.name}_validation', held))


# ----------------------------------------------------------------- images never trained on

@dataclasses.dataclass(frozen=True)
class Protected:
  """The images never trained on (but under the paper's protocol): PROTECTED_SETS and the
  evaluation sets, by ID and by content."""
  sets: tuple[str, ...]
  ids: frozenset
  digests: frozenset

  @classmethod
  def of(cls, splits: dict[str, Split]) -> 'Protected':
    """Of the splits {set name: split} (those of PROTECTED_SETS and data.eval_sets)."""
    return cls(tuple(splits), frozenset(i for s in splits.values() for i in s.ids),
               frozenset(d for s in splits.values() for d in s.digests))


def protected_sets(eval_sets: Sequence[str]) -> tuple[str, ...]:
  """The sets whose images are never trained on: PROTECTED_SETS and the evaluation sets."""
  return tuple(dict.fromkeys((*PROTECTED_SETS, *eval_sets)))


def without_copies(full: Split, protected: Protected) -> Split:
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
  return subset(full, full.name, keep, {**full.info, 'training_copies_of_eval_images':
                                        [full.ids[i] for i in copies]})


# ------------------------------------------------------------------- mtl4's extra melanomas

def with_extra_melanomas(train: Split, extras: Sequence[Split], protected: Protected, *,
                         known_ids: set[str], paper: bool = False,
                         control: bool = False) -> Split:
  """`train` plus the melanomas of `extras` (ISIC 2017 train and validation, for mtl4), minus
  every image of a protected set (by ID and by content) and every image already in ISIC 2016
  training (`known_ids`: all of it, the held-out validation images included).

  `paper` (data.paper_protocol_train_on_test_images) restores the paper's all-404 protocol,
  which still keeps the validation images out. `control` (data.paper_protocol_matched_control)
  is its control: the paper protocol's list, in its order, with each protected image replaced
  by one of the melanomas the leak-free list adds (chosen in ID-hash order, cycled): the same
  number of extra melanomas (so the same steps and melanoma share) and no test image.
  """
  eval_ids = protected.ids
  held_out = set(known_ids) - set(train.ids)  # the validation images: never trained on
  info = {'available': 0, 'added': 0, 'dropped_in_eval_set': 0, 'dropped_already_in_train': 0,
          'dropped_in_validation': 0, 'in_eval_set_but_kept': 0,
          'paper_protocol_train_on_test_images': paper, 'protected_sets': list(protected.sets)}
  if control:
    info.update(paper_protocol_matched_control=True, replaced_eval_images=0)
  ids = [i for e in extras for i in e.ids]
  digests = [d for e in extras for d in e.digests] or [''] * len(ids)
  labels = np.concatenate([np.asarray(e.labels) for e in extras])
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
    if not paper and not control and image_id in known_ids:
      info['dropped_already_in_train'] += 1
      continue
    info['in_eval_set_but_kept'] += int(image_id in eval_ids)
    keep.append(i)
  if replace:
    pool = sorted((i for i in keep if i >= 0 and ids[i] not in known_ids),
                  key=lambda i: id_order(ids[i]))
    if not pool:
      raise ValueError('data.paper_protocol_matched_control: no ISIC 2017 melanoma outside '
                       'ISIC 2016 and the evaluation sets is left to stand in for the test '
                       'images.')
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
  return Split(f'{train.name}+isic2017_melanomas', ConcatSource([train.source, source]),
               np.concatenate([train.labels, labels[keep]]),
               tuple(train.ids) + tuple(ids[i] for i in keep),
               {**train.info, 'extra_melanomas': info},
               tuple(train.digests) + tuple(digests[i] for i in keep) if train.digests else ())


# ------------------------------------------------------------------ the enlarged training set

def enlarged_index(labels: np.ndarray, multiplicities: Sequence[int]) -> np.ndarray:
  """(example, transform id) pairs of the enlarged training set, shape (N_enlarged, 2).

  Args:
    labels: class of each example.
    multiplicities: multiplicities[c] transforms for class c (paper: benign 4, melanoma 16).
  """
  ids = [augment.transform_ids(m) for m in multiplicities]
  pairs = [(i, t) for i, c in enumerate(np.asarray(labels)) for t in ids[int(c)]]
  return np.asarray(pairs, np.int64).reshape(-1, 2)


def training_set_record(train: Split, validation: Split | None,
                        multiplicities: Sequence[int]) -> dict[str, Any]:
  """What a run trains on, by identity (workdir/training_set.json): every training example's
  ID and label in the pipeline's order, the transforms per class, the held-out validation IDs,
  and their SHA-256. A resume whose record differs is refused (workdir.check_training_set).
  """
  record = {'examples': [[str(i), int(l)] for i, l in zip(train.ids, train.labels)],
            'transforms': {'benign': int(multiplicities[0]),
                           'melanoma': int(multiplicities[1])},
            'validation': sorted(validation.ids) if validation is not None else []}
  record['sha256'] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
  return record
