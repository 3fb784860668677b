"""Calibration measures (ECE, Brier), the Platt fit, the validation split held out of the
training data, and what the held-out split means for resuming older runs."""

import json

import numpy as np
import pytest

from conftest import tiny_config
from skinmtl_jax import calibration, evaluate, input_pipeline, metrics, report, splits, workdir
from skinmtl_jax.config_base import ConfigError


def test_ece_and_brier_against_hand_computed_cases():
  # One image per bin (15 bins: 0.1 -> bin 1, 0.2 -> 3, 0.8 -> 12, 0.4 -> 6):
  # ECE = (0.1 + 0.2 + 0.2 + 0.6) / 4; Brier = (0.01 + 0.04 + 0.04 + 0.36) / 4.
  y, p = [0, 0, 1, 1], [0.1, 0.2, 0.8, 0.4]
  assert metrics.expected_calibration_error(y, p) == pytest.approx(0.275)
  assert metrics.brier_score(y, p) == pytest.approx(0.1125)
  # Two images in one bin ([10/15, 11/15)): |0.5 - 0.71| = 0.21.
  assert metrics.expected_calibration_error([1, 0], [0.70, 0.72]) == pytest.approx(0.21)
  # Calibrated: a quarter melanomas at 0.25 -> ECE 0; Brier (3 x 0.0625 + 0.5625) / 4.
  assert metrics.expected_calibration_error([1, 0, 0, 0], [0.25] * 4) == pytest.approx(0.0)
  assert metrics.brier_score([1, 0, 0, 0], [0.25] * 4) == pytest.approx(0.1875)
  # A probability of exactly 1 falls in the last bin, not past it.
  assert metrics.expected_calibration_error([1, 1], [1.0, 1.0]) == 0.0
  r = metrics.reliability([1, 0], [0.70, 0.72])
  assert r['count'][10] == 2 and r['frequency'][10] == 0.5 and r['count'].sum() == 2


def _overconfident_prior_shifted(n, rng):
  """Labels at 20 % melanomas, and a model whose logit is 3x too steep and shifted by +2 (as
  if trained on a set of mostly melanomas)."""
  true_logit = rng.normal(-1.9, 1.5, n)
  y = (rng.random(n) < 1 / (1 + np.exp(-true_logit))).astype(int)
  p = 1 / (1 + np.exp(-(3 * true_logit + 2)))
  return y, p


def test_platt_fit_lowers_the_nll_of_an_overconfident_prior_shifted_model_on_held_out_data():
  rng = np.random.default_rng(0)
  y_val, p_val = _overconfident_prior_shifted(400, rng)
  y_test, p_test = _overconfident_prior_shifted(4000, rng)
  fitted = calibration.fit(y_val, p_val)
  assert fitted['temperature'] == pytest.approx(3, rel=0.3)    # undoes the 3x steepness
  assert fitted['bias'] == pytest.approx(-2 / 3, abs=0.35)     # and the shift (2 / T)
  assert fitted['nll_after'] < fitted['nll_before']
  before, after = p_test, calibration.apply(p_test, fitted)
  assert calibration.nll(y_test, after) < 0.8 * calibration.nll(y_test, before)
  assert (metrics.expected_calibration_error(y_test, after)
          < 0.5 * metrics.expected_calibration_error(y_test, before))
  assert metrics.brier_score(y_test, after) < metrics.brier_score(y_test, before)
  # Monotonic: the ranking (AUC) is unchanged.
  assert metrics.roc_auc(y_test, after) == pytest.approx(metrics.roc_auc(y_test, before))
  # No fit without both classes; a missing fit changes nothing.
  assert calibration.fit([0, 0, 0], [0.1, 0.5, 0.9]) is None
  np.testing.assert_array_equal(calibration.apply([0.2, 0.7], None), [0.2, 0.7])


def test_calibrated_scores_and_the_report_show_both_rows():
  y = np.array([0] * 8 + [1] * 2)
  p = np.array([0.6] * 8 + [0.9] * 2)  # every benign image called melanoma at 0.5
  c = {'temperature': 1.0, 'bias': -2.0, 'n': 40}
  scored = evaluate.scores(y, None, p, threshold=0.5, bootstrap_samples=0)[0]
  scored['calibrated'] = evaluate.calibrated_scores(y, p, c, threshold=0.5)
  assert scored['tnr'] == 0.0 and scored['calibrated']['tnr'] == 1.0
  assert scored['calibrated']['ece'] < scored['ece']
  text = report.calibration_section(scored, c, 'tiny', threshold=0.5)
  assert '| as trained (the rows above) |' in text and 'calibrated (T 1.000, bias -2.000' in text


def test_validation_indices_are_stratified_and_chosen_by_id():
  ids = [f'ISIC_{i:07d}' for i in range(200)]
  labels = np.array([1 if i % 5 == 0 else 0 for i in range(200)])  # 20 % melanomas
  held = splits.validation_indices(ids, labels, 0.1)
  assert len(held) == 20 and labels[held].sum() == 4               # the natural balance
  # The choice follows the IDs, not their order or the other images.
  order = np.random.default_rng(0).permutation(200)
  again = splits.validation_indices([ids[i] for i in order], labels[order], 0.1)
  assert sorted(ids[order[i]] for i in again) == sorted(ids[i] for i in held)
  assert len(splits.validation_indices(ids, labels, 0.0)) == 0


def test_validation_split_is_held_out_of_training():
  cfg = tiny_config()
  train, validation = input_pipeline.train_and_validation(cfg.data)
  assert not set(train.ids) & set(validation.ids)
  assert len(train.ids) + len(validation.ids) == cfg.data.synthetic.num_train
  assert set(validation.labels) == {0, 1}
  assert train.info['validation_examples'] == len(validation.ids)
  assert input_pipeline.get_split(cfg.data, 'train').ids == train.ids
  cfg.data.validation_fraction = 0.0
  train0, none = input_pipeline.train_and_validation(cfg.data)
  assert none is None and len(train0.ids) == cfg.data.synthetic.num_train


def test_a_run_saved_before_validation_fraction_existed_resumes_only_without_it(tmp_path):
  cfg = tiny_config()
  old = json.loads(cfg.to_json_best_effort())
  del old['data']['validation_fraction']
  (tmp_path / 'config.json').write_text(json.dumps(old))
  (tmp_path / 'checkpoints' / '3').mkdir(parents=True)
  assert 'data.validation_fraction' not in workdir.CHANGEABLE
  # It trained on every image: resuming it under the new default would change its data.
  with pytest.raises(ConfigError, match=r'data.validation_fraction: 0.0 -> 0.1'):
    workdir.check_and_save_config(cfg, str(tmp_path))
  cfg.data.validation_fraction = 0.0
  workdir.check_and_save_config(cfg, str(tmp_path))
  # And a started run cannot change it.
  cfg.data.validation_fraction = 0.2
  with pytest.raises(ConfigError, match='data.validation_fraction'):
    workdir.check_and_save_config(cfg, str(tmp_path))
