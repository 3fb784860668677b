"""How sure the second opinion is (skinmtl_jax/uncertainty.py): the measures on hand-built
ensembles, predict's map, overlay and record, the operating point, the review flag's
thresholds from the validation split, decision.json, and the referral table and figure."""

import csv
import functools
import json
import math

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from skinmtl_jax import (config_base, evaluate, input_pipeline, models, predict, report, splits,
                         steps, uncertainty)
from skinmtl_jax.config_base import ConfigError

H, W = 12, 16


def _h(p):
  return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def _disagreeing_masks():
  """Three members' hard lesion maps (3, 1, H, W): a 4x6 square; member 1 adds two pixels,
  member 2 drops a corner. Returns (maps, the pixels where they disagree)."""
  base = np.zeros((H, W), np.float32)
  base[3:7, 4:10] = 1
  m1, m2 = base.copy(), base.copy()
  m1[2, 5] = m1[8, 12] = 1
  m2[3, 4] = 0
  disagree = np.zeros((H, W), bool)
  disagree[2, 5] = disagree[8, 12] = disagree[3, 4] = True
  return np.stack([base, m1, m2])[:, None], disagree


def _predictor(lesion, melanoma, opinions_are='members'):
  """A predictor that gives these opinions (N, 1, ...), as predict.make_predictor does."""
  opinions = {'lesion_prob': lesion, 'melanoma_prob': melanoma}
  return lambda images: {'lesion_prob': lesion.mean(0), 'melanoma_prob': melanoma.mean(0),
                         'opinions': opinions, 'opinions_are': opinions_are,
                         'members': len(lesion), 'views': 1}


def _image(tmp_path, name='lesion.png'):
  path = tmp_path / name
  rgb = np.random.default_rng(0).integers(40, 200, (H, W, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(path)
  return path, rgb


def test_three_members_that_disagree_on_known_pixels(tmp_path):
  lesion, disagree = _disagreeing_masks()
  melanoma = np.array([[0.2], [0.6], [0.7]], np.float32)
  m = {k: np.asarray(v)[0] for k, v in uncertainty.mask_measures(lesion, 0.5).items()}
  assert m['mask_disagreement'] == pytest.approx(3 / (H * W))
  # |m0| = 24, |m1| = 26, |m2| = 23; m0&m1 = 24, m0&m2 = 23, m1&m2 = 23.
  assert m['mask_dice_between'] == pytest.approx((48 / 50 + 46 / 47 + 46 / 49) / 3, abs=1e-6)
  assert not m['lesion_empty'] and not m['lesion_at_border']
  c = {k: np.asarray(v)[0] for k, v in uncertainty.melanoma_measures(melanoma, 0.5).items()}
  assert c['melanoma_prob_std'] == pytest.approx(np.std([0.2, 0.6, 0.7]), abs=1e-6)
  assert c['melanoma_prob_range'] == pytest.approx(0.5, abs=1e-6)
  assert c['mutual_information'] == pytest.approx(
      _h(0.5) - (_h(0.2) + _h(0.6) + _h(0.7)) / 3, abs=1e-5)
  assert c['votes_melanoma'] == 2

  # Through predict: the map is non-zero exactly on those pixels, the overlay tints them.
  path, rgb = _image(tmp_path)
  record = predict.predict_file(str(path), str(tmp_path), _predictor(lesion, melanoma), (H, W),
                                0.5, 'ckpt')
  with Image.open(record['uncertainty_map']) as im:
    canvas = np.asarray(im.convert('RGB'))
  assert canvas.shape[0] >= H and canvas.shape[1] > W            # a colour bar on the right
  zero = canvas[0, 0]                                              # entropy 0
  np.testing.assert_array_equal((canvas[:H, :W] != zero).any(-1), disagree)
  with Image.open(record['overlay']) as im:
    overlay = np.asarray(im)
  full = lesion.mean(0)[0] >= 0.5
  outline = predict._outline(full, 1)  # pylint: disable=protected-access
  np.testing.assert_array_equal((overlay != rgb).any(-1), disagree | outline)
  u = record['uncertainty']
  assert u['opinions'] == 3 and u['opinions_are'] == 'members' and u['votes_melanoma'] == 2
  assert u['mask_disagreement'] == pytest.approx(3 / (H * W))
  assert u['melanoma_prob_range'] == pytest.approx(0.5, abs=1e-6)
  assert record['review'] is True
  assert record['review_reasons'][0] == 'members disagree on the decision (2 of 3 say melanoma)'
  # Without decision.json the decision is at the run's threshold, and says so.
  assert record['decision'] == 'melanoma' and record['decision_threshold'] == 0.5
  assert record['operating_point'].startswith("the run's threshold 0.5 (no operating point")


def test_members_that_agree_have_zero_spread(tmp_path):
  lesion, _ = _disagreeing_masks()
  same = np.repeat(lesion[:1], 3, axis=0)
  melanoma = np.full((3, 1), 0.3, np.float32)
  c = uncertainty.melanoma_measures(melanoma, 0.5)
  for k in ('melanoma_prob_std', 'melanoma_prob_range', 'mutual_information'):
    assert float(c[k][0]) == 0.0, k                                # exactly, not about
  assert int(c['votes_melanoma'][0]) == 0
  m = uncertainty.mask_measures(same, 0.5)
  assert float(m['mask_dice_between'][0]) == 1.0 and float(m['mask_disagreement'][0]) == 0.0
  path, rgb = _image(tmp_path)
  record = predict.predict_file(str(path), str(tmp_path), _predictor(same, melanoma), (H, W),
                                0.5, 'ckpt')
  with Image.open(record['uncertainty_map']) as im:
    canvas = np.asarray(im.convert('RGB'))
  assert (canvas[:H, :W] == canvas[0, 0]).all()                    # no pixel in doubt
  with Image.open(record['overlay']) as im:
    overlay = np.asarray(im)
  full = same.mean(0)[0] >= 0.5
  np.testing.assert_array_equal((overlay != rgb).any(-1),
                                predict._outline(full, 1))  # pylint: disable=protected-access
  assert record['uncertainty']['mutual_information'] == 0.0
  assert record['review'] is False and record['review_reasons'] == []


def test_one_opinion_says_no_uncertainty_is_available(tmp_path):
  lesion, _ = _disagreeing_masks()
  assert uncertainty.melanoma_measures(np.array([[0.4]]), 0.5) == {}
  assert set(uncertainty.mask_measures(lesion[:1], 0.5)) == {'lesion_empty', 'lesion_at_border'}
  path, _ = _image(tmp_path)
  record = predict.predict_file(str(path), str(tmp_path),
                                _predictor(lesion[:1], np.array([[0.4]], np.float32)), (H, W),
                                0.5, 'ckpt')
  assert record['uncertainty'] is None and 'one opinion' in record['uncertainty_unavailable']
  assert 'uncertainty_map' not in record
  assert not list(tmp_path.glob('*_uncertainty.png'))
  assert any(r.startswith('decision_disagreement: one opinion')
             for r in record['review_not_checked'])
  # A lesion at the border or none is flagged with one opinion too.
  empty = np.zeros_like(lesion[:1])
  record = predict.predict_file(str(path), str(tmp_path),
                                _predictor(empty, np.array([[0.4]], np.float32)), (H, W), 0.5,
                                'ckpt', name='empty')
  assert record['review'] is True and record['review_reasons'] == ['no lesion found']
  edge = lesion[:1].copy()
  edge[0, 0, 0, 0] = 1
  record = predict.predict_file(str(path), str(tmp_path),
                                _predictor(edge, np.array([[0.4]], np.float32)), (H, W), 0.5,
                                'ckpt', name='edge')
  assert record['review_reasons'] == ['the lesion touches the image border']


def test_the_operating_point_reaches_the_sensitivity_and_says_how_sure_it_is():
  # 4 melanomas; 0.75 of them: the 3rd highest melanoma probability.
  assert uncertainty.sensitivity_threshold([1, 1, 1, 1, 0], [0.9, 0.8, 0.3, 0.6, 0.1],
                                           0.75) == 0.6
  assert uncertainty.sensitivity_threshold([0, 0], [0.2, 0.3], 0.9) is None
  lo, hi = uncertainty.wilson_interval(13, 14)   # Wilson 1927, z = 1.96
  assert lo == pytest.approx(0.6853, abs=1e-4) and hi == pytest.approx(0.9873, abs=1e-4)
  rng = np.random.default_rng(0)
  labels = np.r_[np.ones(14), np.zeros(46)].astype(int)            # ~14 melanomas, as ISIC's
  probs = np.r_[rng.beta(4, 2, 14), rng.beta(2, 4, 46)]
  op = uncertainty.fit_operating_point(labels, probs, 0.9, bootstrap_samples=300)
  assert op['threshold'] == np.sort(probs[:14])[::-1][12]         # ceil(0.9 x 14) = 13th
  assert op['sensitivity'] == 13 / 14 and op['melanomas'] == 14
  assert op['threshold_ci95'][0] <= op['threshold'] <= op['threshold_ci95'][1]
  assert op['threshold_ci95'][1] - op['threshold_ci95'][0] > 0.05  # 14 melanomas: loose
  assert op['sensitivity_out_of_bag'] < op['sensitivity']          # in-sample is optimistic
  assert op['specificity'] == np.mean(probs[14:] < op['threshold'])
  assert uncertainty.fit_operating_point(np.zeros(5, int), np.full(5, 0.3), 0.9) is None
  # On another set: its sensitivity and specificity at that threshold.
  got = uncertainty.at_operating_point([1, 1, 0, 0], [0.9, 0.1, 0.5, 0.05],
                                       {'operating_point': {'threshold': 0.4}},
                                       bootstrap_samples=50)
  assert got['sensitivity'] == 0.5 and got['specificity'] == 0.5
  assert got['confusion'] == [[1, 1], [1, 1]] and set(got['ci95']) == {'sensitivity',
                                                                       'specificity'}


def _validation(seed, n=40):
  """Per-image outputs of a 3-member ensemble on a validation split of `n` images."""
  rng = np.random.default_rng(seed)
  labels = (rng.random(n) < 0.3).astype(int)
  labels[:2] = [0, 1]
  members = np.clip(labels * 0.4 + 0.3 + rng.normal(0, 0.15, (3, n)), 0.01, 0.99)
  per_image = {'label': labels.tolist(), 'melanoma_prob': members.mean(0).tolist(),
               'dice': rng.uniform(0.5, 1, n).tolist(),
               'mask_dice_between': rng.uniform(0.6, 1, n).tolist(),
               'mask_disagreement': rng.uniform(0, 0.1, n).tolist(),
               'lesion_at_border': (rng.random(n) < 0.1).astype(int).tolist(),
               'lesion_empty': np.zeros(n, int).tolist()}
  per_image.update({f'melanoma_prob_member{i}': members[i].tolist() for i in range(3)})
  per_image.update({f'dice_member{i}': per_image['dice'] for i in range(3)})
  return labels, per_image


def test_the_flags_thresholds_come_from_the_validation_split():
  cfg = uncertainty.DecisionConfig(target_sensitivity=0.9, review_share=0.1)
  fitted = []
  for seed in (0, 1):
    labels, per_image = _validation(seed)
    d = uncertainty.fit_decision(labels, per_image, cfg, bootstrap_samples=200)
    assert d['review']['mask_dice_min'] == pytest.approx(
        np.quantile(per_image['mask_dice_between'], 0.1))
    op = d['operating_point']
    assert op['threshold'] == uncertainty.sensitivity_threshold(
        labels, per_image['melanoma_prob'], 0.9)
    assert d['review']['near_threshold'] == op['threshold_ci95']
    assert d['fitted_on'] == {'split': 'validation', 'images': 40, 'melanomas': int(labels.sum()),
                              'members': 3, 'views': 1}
    t, name = uncertainty.decision_threshold(d, 0.5)
    assert t == op['threshold'] and name.startswith(
        f'melanoma sensitivity 0.90 on the validation split: melanoma_prob >= {t:.3f}')
    # About a tenth of the validation images fall below the mask threshold.
    assert np.mean(np.asarray(per_image['mask_dice_between']) < d['review']['mask_dice_min']
                   ) == pytest.approx(0.1, abs=0.03)
    fitted.append(d)
  # With a calibration, the same threshold on the calibrated probability is named too.
  d = uncertainty.fit_decision(labels, per_image, cfg, bootstrap_samples=20,
                               calibration={'temperature': 2.0, 'bias': 0.0})
  t = d['operating_point']['threshold']
  q = d['operating_point']['threshold_calibrated']
  assert q == pytest.approx(1 / (1 + math.exp(-math.log(t / (1 - t)) / 2)))
  assert f'melanoma_prob_calibrated >= {q:.3f}' in uncertainty.decision_threshold(d, 0.5)[1]
  # Another validation split, other thresholds.
  assert fitted[0]['review']['mask_dice_min'] != fitted[1]['review']['mask_dice_min']
  assert (fitted[0]['operating_point']['threshold']
          != fitted[1]['operating_point']['threshold'])
  # Without melanomas, or at target 0, no operating point, and the reason why.
  labels, per_image = _validation(0)
  d = uncertainty.fit_decision(np.zeros_like(labels), per_image, cfg)
  assert d['operating_point'] is None and '0 melanomas' in d['operating_point_missing']
  assert d['review']['near_threshold'] is None
  d = uncertainty.fit_decision(labels, per_image, cfg._replace(target_sensitivity=0.0))
  assert 'target_sensitivity is 0' in d['operating_point_missing']
  assert uncertainty.decision_threshold(d, 0.5)[0] == 0.5


def test_the_referral_table_and_figure_are_written(tmp_path):
  # The referral curve by hand: refer the most uncertain first, the error rate of the rest.
  x, y = uncertainty.referral_curve([3, 2, 1, 0], [1, 0, 1, 0])
  np.testing.assert_allclose(x, [0, 0.25, 0.5, 0.75])
  np.testing.assert_allclose(y, [2 / 4, 1 / 3, 1 / 2, 0])
  # Six images, two members: the review flag's table counted by hand.
  labels = [1, 0, 0, 1, 0, 0]
  m0, m1 = [0.9, 0.6, 0.1, 0.45, 0.2, 0.1], [0.8, 0.3, 0.1, 0.35, 0.2, 0.1]
  per_image = {'label': labels, 'melanoma_prob': list((np.add(m0, m1) / 2)),
               'melanoma_prob_member0': m0, 'melanoma_prob_member1': m1,
               'dice_member0': [0] * 6, 'dice_member1': [0] * 6,
               'dice': [0.95, 0.9, 0.5, 0.9, 0.92, 0.96],
               'mask_dice_between': [0.97, 0.9, 0.6, 0.9, 0.95, 0.97],
               'mask_disagreement': [0.01, 0.02, 0.2, 0.03, 0.01, 0.0],
               'lesion_at_border': [0] * 6, 'lesion_empty': [0] * 6}
  decision = {'operating_point': {'threshold': 0.5, 'threshold_ci95': [0.4, 0.5],
                                  'target_sensitivity': 0.9, 'melanomas': 2},
              'review': {'mask_dice_min': 0.8, 'near_threshold': [0.4, 0.5]}, 'review_share': 0.1}
  a = uncertainty.assess(labels, per_image, decision, fallback_threshold=0.5,
                         seg_error_dice=0.7)
  # Image 1 (members split 0.6 / 0.3: disagreement; p 0.45 in [0.4, 0.5]: near), image 2
  # (mask Dice 0.6 < 0.8), image 3 (p 0.4: near) are flagged; image 3 is the one wrong decision
  # (a melanoma at 0.4), image 2 the one bad mask. Closeness to the threshold ranks image 3
  # above 4 of the 5 right decisions (image 1, at 0.45, is closer).
  assert a['per_image']['columns']['review'] == [0, 1, 1, 1, 0, 0]
  assert a['flagged'] == {'n': 3, 'share': 0.5, 'decision_wrong': 1 / 3, 'decision_wrong_n': 1,
                          'dice_below': 1 / 3, 'dice_below_n': 1}
  assert a['not_flagged']['decision_wrong'] == 0 and a['not_flagged']['dice_below'] == 0
  assert a['by_reason']['decision_disagreement']['n'] == 1
  assert a['by_reason']['mask_agreement']['n'] == 1 and a['by_reason']['near_threshold']['n'] == 2
  assert a['auc']['mask_dice_between']['dice_below'] == 1.0      # the bad mask, least agreed
  assert a['auc']['near_threshold']['decision_wrong'] == pytest.approx(0.8)
  text = report.review_section('test', a, decision, seg_error_dice=0.7)
  assert '| **flagged for review** | 3 | 50.00 | 33.33 (1) | 33.33 (1) |' in text
  assert '| not flagged | 3 | 50.00 | 0.00 (0) | 0.00 (0) |' in text
  assert '| mutual information (BALD) |' in text and 'referral_test.png' in text
  assert report.referral(str(tmp_path / 'referral_test.png'), a, 'test', seg_error_dice=0.7)
  with Image.open(tmp_path / 'referral_test.png') as im:
    assert im.size[0] > 600                                          # two panels


def test_decision_json_is_tied_to_its_checkpoints_model(tmp_path, caplog):
  labels, per_image = _validation(0)
  d = uncertainty.fit_decision(labels, per_image, uncertainty.DecisionConfig(),
                               bootstrap_samples=50)
  uncertainty.save(str(tmp_path), d, 7, 'model-a')
  assert uncertainty.load(str(tmp_path), 7, 'model-a')['review'] == d['review']
  assert uncertainty.load(str(tmp_path), 8, 'model-a') is None
  assert uncertainty.load(str(tmp_path), 7, 'model-b') is None
  assert 'fitted for another model' in caplog.text and 'no operating point' in caplog.text
  saved = json.loads((tmp_path / 'decision.json').read_text())
  saved['operating_point']['threshold'] = 3.0
  (tmp_path / 'decision.json').write_text(json.dumps(saved))
  assert uncertainty.load(str(tmp_path), 7, 'model-a') is None
  uncertainty.save(str(tmp_path), None, 7, 'model-a')
  assert not (tmp_path / 'decision.json').exists()


def test_the_decision_fields_are_validated():
  for field, value in (('target_sensitivity', 1.5), ('review_share', 0.0),
                       ('seg_error_dice', 0.0)):
    c = tiny_config()
    c.decision[field] = value
    with pytest.raises(ConfigError, match=f'decision.{field}'):
      config_base.validate_config(c)
  c = tiny_config()
  del c['decision']                                  # a run saved before the group existed
  config_base.validate_config(c)
  assert (uncertainty.DecisionConfig.from_config(config_base.from_saved(c.to_dict()).decision)
          == uncertainty.DecisionConfig())


@pytest.fixture(scope='module')
def two_members():
  cfg = tiny_config('mtl3')
  cfg.num_seeds = 2
  cfg.data.synthetic.num_test = 40
  model = models.create_model(cfg.model)
  state = steps.create_train_state(model, steps.create_optimizer(cfg.optim, 1),
                                   steps.member_keys(0, 2), (32, 32))
  stats = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(3), x.shape),
                       state.batch_stats)
  state = state.replace(batch_stats=stats)
  # Untrained, both members call every pixel lesion at 0.5; at their median probability their
  # masks differ, by an amount that varies from image to image.
  test = input_pipeline.get_split(cfg.data, 'test')
  images = np.stack([test.source[i]['image'] for i in range(len(test.source))])
  cfg.threshold = float(np.median(steps.member_predictions(state, images,
                                                           model=model)['lesion_prob']))
  return cfg, model, state


def _convolutions(fn, *args) -> int:
  hlo = jax.jit(fn).lower(*args).compile().as_text()
  return hlo.count(' convolution(') + hlo.count('custom-call(')


def test_evaluation_runs_the_members_forward_pass_once(two_members):
  cfg, model, state = two_members
  batch = {'image': np.zeros((2, 32, 32, 3), np.uint8), 'mask': np.zeros((2, 32, 32), np.uint8),
           'label': np.zeros(2, np.int32)}
  plain = functools.partial(steps.eval_step, model=model)
  ours = functools.partial(evaluate.evaluation_step, model=model)
  assert _convolutions(ours, state, batch) == _convolutions(plain, state, batch)
  out = jax.jit(ours)(state, batch)
  assert set(out['uncertainty']) == set(uncertainty.MASK_COLUMNS)
  del cfg


def _subset(split, idx, name):
  return splits.Split(name, [split.source[i] for i in idx], split.labels[idx],
                      tuple(split.ids[i] for i in idx))


def test_evaluation_fits_on_the_validation_split_and_reports_the_referral(two_members,
                                                                         tmp_path):
  """Through evaluate_and_report: decision.json's thresholds re-derive from
  per_image_validation.csv, another validation split gives others, and report.md and
  metrics.json hold the operating point and the referral table."""
  cfg, model, state = two_members
  test = input_pipeline.get_split(cfg.data, 'test')
  labels = np.asarray(test.labels)
  pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
  assert len(pos) >= 6 and len(neg) >= 12
  fitted = []
  for k, (p, n) in enumerate(((pos[:3], neg[:6]), (pos[3:6], neg[6:12]))):
    validation = _subset(test, np.r_[p, n], 'validation')
    run = tmp_path / f'run{k}'
    run.mkdir()
    results = evaluate.evaluate_and_report(
        state, model, str(run), {'test': test}, {'params': 1, 'steps': 0},
        experiment=cfg.experiment, model_cfg=cfg.model,
        decision_cfg=uncertainty.DecisionConfig.from_config(cfg.decision),
        threshold=cfg.threshold, batch_size=cfg.eval_batch_size, validation=validation)
    d = json.loads((run / 'decision.json').read_text())
    with open(run / 'per_image_validation.csv', encoding='utf-8') as f:
      rows = list(csv.DictReader(f))
    columns = {key: [float(r[key]) for r in rows] for key in rows[0] if key != 'id'}
    again = uncertainty.fit_decision([int(v) for v in columns['label']], columns,
                                     uncertainty.DecisionConfig.from_config(cfg.decision))
    assert d['review']['mask_dice_min'] == pytest.approx(again['review']['mask_dice_min'])
    assert d['operating_point']['threshold'] == pytest.approx(
        again['operating_point']['threshold'])
    assert d['fitted_on']['members'] == 2 and d['fitted_on']['images'] == 9
    entry = results['test']['ensemble']
    assert entry['operating_point']['threshold'] == d['operating_point']['threshold']
    assert entry['review']['all']['n'] == len(labels) and 'auc' in entry['review']
    assert results['validation']['review']['all']['n'] == 9
    text = (run / 'report.md').read_text()
    assert '## The decision and the review flag' in text and '**operating point**' in text
    assert 'Review flag on test' in text and '| **flagged for review** |' in text
    assert 'Review flag on validation: 9 images, 2 opinions each' in text
    assert 'In-sample: the thresholds were fitted on these images.' in text
    for png in ('referral_test.png', 'referral_validation.png'):
      assert (run / png).exists()
    header = (run / 'per_image_test.csv').read_text().splitlines()[0].split(',')
    assert {'mask_dice_between', 'mutual_information', 'review'} <= set(header)
    metrics_json = json.loads((run / 'metrics.json').read_text())
    assert metrics_json['decision']['review'] == d['review']
    fitted.append(d)
  assert fitted[0]['review']['mask_dice_min'] != fitted[1]['review']['mask_dice_min']
  assert (fitted[0]['operating_point']['threshold']
          != fitted[1]['operating_point']['threshold'])
