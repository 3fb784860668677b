"""The data protocol by identity (skinmtl_jax/splits.py lists the promises these guard): small
hand-made splits whose IDs overlap on purpose between ISIC 2016 training, its test set, another
evaluation set, the validation split and the ISIC 2017 melanomas; each test asserts which IDs
land where, and with how many transforms."""

import csv
import json

import numpy as np
import pytest

from helpers import run_main
from skinmtl_jax import augment, evaluate, input_pipeline, splits

MEL, BEN = 1, 0


def _split(name, rows, copies=None):
  """A split of (id, label) rows; each image's digest is its own ID's, or, where `copies` maps
  an ID to another, the other image's (a copy of its pixels under another ID)."""
  copies = copies or {}
  ids = tuple(i for i, _ in rows)
  return splits.Split(name, [{'id': i, 'label': l} for i, l in rows],
                      np.array([l for _, l in rows], np.int32), ids,
                      digests=tuple(f'pixels of {copies.get(i, i)}' for i in ids))


# ISIC 2016 training: 5 melanomas, 15 benign; T19 is a copy of the test image E1 under its own
# ID. Its test set E0-E5, another evaluation set P0-P1. ISIC 2017 repeats test images (E0, E2),
# a training image (T0) and every training melanoma that the validation split holds.
TRAIN = _split('isic2016_train', [(f'T{i}', MEL if i < 5 else BEN) for i in range(20)],
               copies={'T19': 'E1'})
TEST = _split('isic2016_test', [('E0', MEL), ('E1', BEN), ('E2', MEL), ('E3', BEN), ('E4', BEN),
                                ('E5', MEL)])
PH2 = _split('ph2', [('P0', MEL), ('P1', BEN)])
FRACTION = 0.2


def _validation_ids():
  return set(splits.hold_out(TRAIN, FRACTION)[1].ids)


def _extras():
  held_melanoma = sorted(i for i in _validation_ids() if int(i[1:]) < 5)
  assert held_melanoma, 'the fixture needs a melanoma in the validation split'
  return [_split('isic2017_train', [('X0', MEL), ('E0', MEL), ('T0', MEL), ('X1', MEL),
                                    (held_melanoma[0], MEL), ('X9', BEN), ('X2', MEL)]),
          _split('isic2017_validation', [('E2', MEL), ('X3', MEL), ('P0', MEL)])]


def _protected(eval_sets=('isic2016_test', 'ph2')):
  named = {'isic2016_test': TEST, 'ph2': PH2}
  return splits.Protected.of({n: named[n] for n in splits.protected_sets(eval_sets)})


def _mtl4(paper=False, control=False, eval_sets=('isic2016_test', 'ph2')):
  protected = _protected(eval_sets)
  full = TRAIN if paper else splits.without_copies(TRAIN, protected)
  train, validation = splits.hold_out(full, FRACTION)
  return splits.with_extra_melanomas(train, _extras(), protected, known_ids=set(TRAIN.ids),
                                     paper=paper, control=control), validation


# ----------------------------------------------------------------------- the validation split

def test_validation_split_is_stratified_by_class():
  train, validation = splits.hold_out(TRAIN, FRACTION)
  assert sorted(validation.labels.tolist()) == [BEN] * 3 + [MEL] * 1    # round(0.2 x 15, 0.2 x 5)
  assert len(train.ids) == 16 and not set(train.ids) & set(validation.ids)
  assert train.info['validation_examples'] == 4 and train.info['validation_melanomas'] == 1
  # At least one of a class of two or more; none of a class of one.
  tiny = _split('t', [('a', MEL), ('b', BEN), ('c', BEN)])
  assert splits.hold_out(tiny, 0.01)[1].labels.tolist() == [BEN]


def test_validation_images_are_chosen_by_id_not_by_order():
  held = _validation_ids()
  order = np.random.default_rng(0).permutation(len(TRAIN.ids))
  shuffled = splits.subset(TRAIN, 'shuffled', order)
  assert set(splits.hold_out(shuffled, FRACTION)[1].ids) == held
  for label, n in ((MEL, 1), (BEN, 3)):  # the IDs whose SHA-256 sorts first, per class
    of_class = [i for i, l in zip(TRAIN.ids, TRAIN.labels) if l == label]
    assert set(sorted(of_class, key=splits.id_order)[:n]) <= held


def test_validation_comes_from_the_training_images_only():
  train, validation = _mtl4()
  assert set(validation.ids) <= set(TRAIN.ids)
  assert not set(validation.ids) & (set(TEST.ids) | set(PH2.ids) | {'X0', 'X1', 'X2', 'X3'})
  assert validation.ids == splits.hold_out(TRAIN, FRACTION)[1].ids   # extras change nothing


def test_validation_images_are_never_trained_on_nor_enlarged():
  for kwargs in ({}, {'paper': True}, {'control': True}):
    train, validation = _mtl4(**kwargs)
    assert not set(validation.ids) & set(train.ids), kwargs   # the ISIC 2017 copy included
    assert train.info['extra_melanomas']['dropped_in_validation'] == 1, kwargs
    pairs = splits.enlarged_index(train.labels, (4, 16))
    assert not {train.ids[i] for i in pairs[:, 0]} & set(validation.ids)


# ------------------------------------------------------------- images never trained on

def test_no_evaluation_image_is_trained_on_by_id_or_by_content():
  for eval_sets in (('isic2016_test', 'ph2'), ('ph2',), ()):
    train, _ = _mtl4(eval_sets=eval_sets)
    trained = set(train.ids)
    assert not trained & set(TEST.ids), eval_sets         # ISIC 2016 test, whatever eval_sets
    assert 'T19' not in trained, eval_sets                # a copy of E1 under another ID
    assert ('P0' in trained) == ('ph2' not in eval_sets), eval_sets
  assert TRAIN.info == {} and 'T19' in TRAIN.ids
  copies = splits.without_copies(TRAIN, _protected())
  assert copies.info['training_copies_of_eval_images'] == ['T19']


def test_leak_free_extra_melanomas_drop_duplicates_and_count_them():
  train, validation = _mtl4()
  base = [i for i in TRAIN.ids if i not in validation.ids and i != 'T19']
  assert list(train.ids) == base + ['X0', 'X1', 'X2', 'X3']   # in the files' order
  assert train.labels[len(base):].tolist() == [MEL] * 4
  info = train.info['extra_melanomas']
  assert {k: info[k] for k in ('available', 'added', 'dropped_in_eval_set',
                               'dropped_already_in_train', 'dropped_in_validation',
                               'in_eval_set_but_kept')} == {
      'available': 9, 'added': 4, 'dropped_in_eval_set': 3, 'dropped_already_in_train': 1,
      'dropped_in_validation': 1, 'in_eval_set_but_kept': 0}


def test_the_paper_protocol_and_its_matched_control():
  paper, validation = _mtl4(paper=True)
  held = [i for i in validation.ids if int(i[1:]) < 5]
  added = list(paper.ids[len(paper.ids) - paper.info['extra_melanomas']['added']:])
  assert added == ['X0', 'E0', 'T0', 'X1', 'X2', 'E2', 'X3', 'P0']  # all but the held one
  assert held[0] not in paper.ids and 'T19' in paper.ids           # the paper's training set
  assert paper.info['extra_melanomas']['in_eval_set_but_kept'] == 3
  control, _ = _mtl4(control=True)
  extra = list(control.ids[len(control.ids) - len(added):])
  assert len(control.ids) == len(paper.ids) - 1                    # less the copy T19 only
  assert [c for a, c in zip(added, extra) if a == c] == ['X0', 'T0', 'X1', 'X2', 'X3']
  swapped = {a: c for a, c in zip(added, extra) if a != c}
  assert set(swapped) == {'E0', 'E2', 'P0'}
  assert set(swapped.values()) <= {'X0', 'X1', 'X2', 'X3'}          # leak-free ones stand in
  assert control.labels[-len(added):].tolist() == [MEL] * len(added)
  assert control.info['extra_melanomas']['replaced_eval_images'] == 3


# ------------------------------------------------------------------------------ enlargement

def test_enlargement_is_4x_benign_16x_melanoma():
  train, validation = splits.hold_out(TRAIN, FRACTION)
  pairs = splits.enlarged_index(train.labels, (4, 16))
  for i, (image_id, label) in enumerate(zip(train.ids, train.labels)):
    tids = sorted(pairs[pairs[:, 0] == i, 1].tolist())
    if label == BEN:
      assert tids == [0, 2, 4, 6], image_id                 # the four right-angle rotations
      assert all(augment._flip_and_angle(t) == (None, a) for t, a in zip(tids, (0, 90, 180, 270)))  # pylint: disable=protected-access
    else:
      assert tids == list(range(16)), image_id
  assert len(pairs) == 12 * 4 + 4 * 16
  assert not set(validation.ids) & {train.ids[i] for i in pairs[:, 0]}


# --------------------------------------------------------------------- calibration, evaluation

def test_the_calibration_is_fitted_on_the_validation_images_only(tmp_path):
  r = run_main(tmp_path, '--config.num_train_steps=2', timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  record = json.loads((tmp_path / 'training_set.json').read_text())
  with open(tmp_path / 'per_image_validation.csv', encoding='utf-8') as f:
    fitted_on = [row['id'] for row in csv.DictReader(f)]
  calibration = json.loads((tmp_path / 'calibration.json').read_text())
  assert sorted(fitted_on) == record['validation'] and calibration['n'] == len(fitted_on)
  assert not set(fitted_on) & {i for i, _ in record['examples']}


def test_every_evaluation_image_is_scored_once_in_order():
  split = _split('test', [(f'E{i}', i % 2) for i in range(7)])
  batches = list(input_pipeline.eval_batches(split, 3))
  assert [ids for _, ids in batches] == [['E0', 'E1', 'E2'], ['E3', 'E4', 'E5'], ['E6']]
  assert [b['valid'].tolist() for b, _ in batches][-1] == [True, False, False]

  def eval_step(state, batch):  # a "model" that reads each image's label off its batch row
    del state
    return {'melanoma_prob': np.asarray(batch['label'], np.float32)[None] * 0.8 + 0.1}

  r = evaluate.evaluate_split(eval_step, None, split, batch_size=3, threshold=0.5,
                              bootstrap_samples=0)
  assert r['n'] == 7 and r['per_image']['id'] == list(split.ids)
  assert r['per_image']['label'] == split.labels.tolist()
  assert r['confusion'] == [[4, 0], [0, 3]]                 # each image once, none padded in


@pytest.fixture(autouse=True)
def _stack_lists(monkeypatch):
  """eval_batches stacks images and masks; these hand-made examples carry IDs and labels."""
  monkeypatch.setattr(input_pipeline, '_stack', lambda examples: {
      'label': np.array([e['label'] for e in examples])})
