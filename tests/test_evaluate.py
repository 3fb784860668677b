"""`evaluate`, `predict` and the ladder table on a tiny trained run."""

import functools
import json
import os

import numpy as np
import pytest
from PIL import Image

from helpers import run_main, run_module
from skinmtl_jax import report, tables


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run')
  r = run_main(workdir, '--config.model.attention_pool=True', timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  (workdir / 'main_stderr.txt').write_text(r.stderr)  # the training log, for the tests
  return workdir


# `python -m <module> <args>` on the CPU (evaluate, predict), 10 minutes at most.
_run = functools.partial(run_module, timeout=600)


def test_a_run_writes_tensorboard_files_curves_progress_and_calibration(tiny_run):
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(tiny_run), size_guidance={'images': 0})
  acc.Reload()
  assert [e.step for e in acc.Scalars('train/loss')] == [2, 4, 6]
  assert acc.Scalars('test/dice')[0].step == 6 and 'images_per_sec' in acc.Tags()['scalars']
  assert {'figures/roc_test', 'figures/reliability_test', 'figures/curves',
          'figures/referral_test'} <= set(acc.Tags()['images'])
  with Image.open(tiny_run / 'curves.png') as im:
    assert im.size[0] > 600
  log = (tiny_run / 'main_stderr.txt').read_text()
  # tiny: 1 member x batch 4 x steps/s, and the ETA; evaluation in images too.
  assert 'images/s (1 member(s) x batch 4 x' in log and 'ETA' in log
  assert 'Evaluated synthetic_test: 12 images in' in log
  m = json.loads((tiny_run / 'metrics.json').read_text())
  assert m['validation_examples'] == 3 and m['train_examples'] == 21
  c = m['calibration']
  assert c['n'] == 3 and c['temperature'] > 0
  assert json.loads((tiny_run / 'calibration.json').read_text())['step'] == 6
  t = m['test']
  assert 0 <= t['ece'] <= 1 and 0 <= t['brier'] <= 1
  assert set(t['calibrated']) == {'ece', 'brier', 'tpr_weighted', 'tnr', 'f1_weighted',
                                  'recall_melanoma', 'recall_benign', 'confusion'}
  report = (tiny_run / 'report.md').read_text()
  assert '| tiny (ours) |' in report and '| as trained (the rows above) |' in report
  assert '| calibrated (T ' in report
  with Image.open(tiny_run / 'reliability_test.png') as im:
    assert im.size[0] > 300


def test_evaluate_writes_every_artifact(tiny_run):
  for name in ('report.md', 'per_image_test.csv', 'boxplot_test.png', 'overlays_test.png',
               'roc_test.png', 'reliability_test.png', 'calibration.json', 'decision.json',
               'referral_test.png', 'referral_validation.png'):
    os.remove(tiny_run / name)
  r = _run('skinmtl_jax.evaluate', f'--workdir={tiny_run}')
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'Evaluated synthetic_test: 12 images in' in r.stderr
  assert not _orbax_info_lines(r.stderr), _orbax_info_lines(r.stderr)
  assert json.loads((tiny_run / 'calibration.json').read_text())['step'] == 6
  m = json.loads((tiny_run / 'metrics.json').read_text())
  t = m['test']
  for k in ('dice', 'iou', 'mcc', 'f1_weighted', 'tpr_weighted', 'tnr', 'auc', 'ap',
            'confusion', 'n', 'ci95', 'dice_pooled', 'recall_melanoma'):
    assert k in t, k
  assert t['ci95']['dice'][0] <= t['dice'] <= t['ci95']['dice'][1]
  report = (tiny_run / 'report.md').read_text()
  assert '| tiny (ours) |' in report and '95 % bootstrap' in report
  rows = (tiny_run / 'per_image_test.csv').read_text().splitlines()
  assert rows[0].startswith('id,label,melanoma_prob,dice,iou,mcc,') and len(rows) == 13
  # One member: the flag's columns, and no measure of a spread (there is none to measure).
  assert {'lesion_at_border', 'lesion_empty', 'review'} <= set(rows[0].split(','))
  assert 'mask_dice_between' not in rows[0] and 'mutual_information' not in rows[0]
  decision = json.loads((tiny_run / 'decision.json').read_text())
  assert decision['step'] == 6 and decision['fitted_on']['images'] == 3
  assert t['review']['all']['n'] == 12 and 'lesion_empty' in t['review']['by_reason']
  assert 'decision_disagreement' in t['review']['unchecked']
  assert '## The decision and the review flag' in report and 'Review flag on test' in report
  for png in ('boxplot_test.png', 'overlays_test.png', 'roc_test.png', 'reliability_test.png',
              'referral_test.png'):
    with Image.open(tiny_run / png) as im:
      assert im.size[0] > 200 and im.size[1] > 200


def _orbax_info_lines(stderr):
  """absl INFO lines logged from orbax's files (what QuietOrbax drops): orbax tags its lines
  with the process and thread."""
  return [l for l in stderr.splitlines() if l.startswith('I') and '[process=' in l]


def test_quiet_orbax_drops_orbax_info_and_keeps_its_warnings():
  import logging
  from skinmtl_jax import checkpointing
  f = checkpointing.QuietOrbax()
  record = lambda level, path: logging.LogRecord('absl', level, path, 1, 'm', None, None)
  assert not f.filter(record(logging.INFO, '/x/orbax/checkpoint/checkpoint_manager.py'))
  assert f.filter(record(logging.WARNING, '/x/orbax/checkpoint/checkpoint_manager.py'))
  assert f.filter(record(logging.INFO, '/x/skinmtl_jax/train.py'))


def test_report_puts_the_papers_row_beside_ours():
  r = {'n': 379, 'confusion': [[250, 54], [20, 55]], 'tpr_weighted': 0.8, 'tnr': 0.82,
       'f1_weighted': 0.81, 'mcc': 0.85, 'iou': 0.82, 'dice': 0.89, 'ci95': {}}
  text = report.report_section('isic2016_test', r, 'mtl4', 10_891_770)
  assert '| mtl4 (paper) | 10.90 | B | 248 (81.58%) | 56 (18.42%) | 80.74 | 81.58 | 82.07 |' in text
  assert '| mtl4 (ours) | 10.89 | B | 250 (82.24%) | 54 (17.76%) | 80.00 | 82.00 | 81.00 |' in text


def test_predict_keeps_each_images_size_and_survives_a_corrupt_file(tiny_run, tmp_path,
                                                                    shared_data):
  bmp = shared_data / 'ph2_fixture' / 'PH2Dataset' / 'PH2 Dataset images'
  images = [bmp / 'IMD002' / 'IMD002_Dermoscopic_Image' / 'IMD002.bmp',
            bmp / 'IMD058' / 'IMD058_Dermoscopic_Image' / 'IMD058.bmp',
            shared_data / 'isic2016' / 'ISBI2016_ISIC_Part1_Test_Data' / 'ISIC_0000013.jpg']
  bad = tmp_path / 'broken.jpg'
  bad.write_bytes(images[2].read_bytes()[:300])
  png = tmp_path / 'odd size.png'
  Image.new('RGB', (123, 77), (180, 120, 100)).save(png)
  out = tmp_path / 'out'
  r = _run('skinmtl_jax.predict', f'--workdir={tiny_run}', f'--out={out}', '--tta',
           str(images[0]), str(bad), str(images[1]), str(images[2]), str(png))
  assert r.returncode == 1                                  # one failed
  assert 'broken.jpg' in r.stderr and '1 of 5 images failed' in r.stderr
  assert 'Predicted 4/5 images' in r.stderr                 # progress
  assert not _orbax_info_lines(r.stderr), _orbax_info_lines(r.stderr)
  lines = [json.loads(l) for l in r.stdout.splitlines() if l.startswith('{')]
  assert len(lines) == 4
  # Every line says which invocation wrote it (predictions.jsonl grows across invocations).
  logged = [json.loads(l) for l in (out / 'predictions.jsonl').read_text().splitlines()]
  assert logged == lines and len({rec['invocation'] for rec in lines}) == 1
  assert 'pid ' in lines[0]['invocation']
  # The run's calibration (fitted for this checkpoint) is applied beside the raw probability.
  for rec in lines:
    assert 0.0 <= rec['melanoma_prob_calibrated'] <= 1.0
    assert rec['decision_calibrated'] in ('benign', 'melanoma')
  for rec, src in zip(lines, [images[0], images[1], images[2], png]):
    with Image.open(src) as im, Image.open(rec['mask']) as mask:
      assert mask.size == im.size
      assert set(np.unique(np.asarray(mask))) <= {0, 255}
    assert 0.0 <= rec['melanoma_prob'] <= 1.0 and rec['decision'] in ('benign', 'melanoma')
    assert rec['checkpoint'].endswith(os.path.join('checkpoints', '6'))
    assert os.path.exists(rec['overlay'])
  # decision_at_threshold is at the run's own threshold: a copy of the run whose threshold lies
  # between these probabilities calls the ones above it melanoma (a hard-coded 0.5 would not).
  import shutil
  probs = sorted(rec['melanoma_prob'] for rec in lines)
  threshold = (probs[1] + probs[2]) / 2
  run = tmp_path / 'run_threshold'
  shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns('.lock'))
  config = json.loads((run / 'config.json').read_text())
  config['threshold'] = threshold
  (run / 'config.json').write_text(json.dumps(config))
  r = _run('skinmtl_jax.predict', f'--workdir={run}', f'--out={tmp_path / "out_t"}', '--tta',
           str(images[0]), str(images[1]), str(images[2]), str(png))
  assert r.returncode == 0, r.stderr[-3000:]
  again = [json.loads(l) for l in r.stdout.splitlines() if l.startswith('{')]
  assert [rec['decision_at_threshold'] for rec in again] == [
      'melanoma' if rec['melanoma_prob'] >= threshold else 'benign' for rec in again]
  assert {rec['decision_at_threshold'] for rec in again} == {'benign', 'melanoma'}
  # `decision` is at the operating point of the run's decision.json.
  assert [rec['decision'] for rec in again] == [
      'melanoma' if rec['melanoma_prob'] >= rec['decision_threshold'] else 'benign'
      for rec in again]
  # --tta reaches the predictor: without it the probabilities are those of one pass (the
  # one-colour png is the same picture under every flip and turn, so it is left out).
  r = _run('skinmtl_jax.predict', f'--workdir={run}', f'--out={tmp_path / "out_plain"}',
           str(images[0]), str(images[1]), str(images[2]))
  assert r.returncode == 0, r.stderr[-3000:]
  plain = [json.loads(l) for l in r.stdout.splitlines() if l.startswith('{')]
  assert len(plain) == 3
  assert all(abs(p['melanoma_prob'] - q['melanoma_prob']) > 1e-7 for p, q in zip(plain, again))


def test_ladder_table_assembles_runs(tmp_path):
  run = tmp_path / 'mtl4'
  run.mkdir()
  (run / 'metrics.json').write_text(json.dumps({'params': 10_891_770, 'isic2016_test': {
      'confusion': [[250, 54], [20, 55]], 'tpr_weighted': 0.8, 'tnr': 0.82, 'f1_weighted': 0.81,
      'mcc': 0.85, 'iou': 0.82, 'dice': 0.89, 'auc': 0.9}}))
  text = tables.table(str(tmp_path), 'isic2016_test')
  assert '| mtl4 | ours | 10.89 | [[250, 54], [20, 55]] | 80.00 | 82.00 | 81.00 | 85.00 | 82.00 | 89.00 | 90.00 |' in text
  assert '| mtl4 | paper | 10.90 | [[248, 56], [17, 58]] | 80.74 | 81.58 | 82.07 |' in text
  assert '| unet | paper | 10.71 |' in text and '| unet | ours' not in text


def test_evaluate_datasets_flag_picks_the_sets(tiny_run):
  """--datasets names the sets evaluated; one the run's data does not have is refused in one
  line and metrics.json is left as it was."""
  before = (tiny_run / 'metrics.json').read_text()
  r = _run('skinmtl_jax.evaluate', f'--workdir={tiny_run}', '--datasets=isic2016_test')
  assert r.returncode != 0 and 'Traceback' not in r.stderr
  assert 'isic2016_test' in r.stderr.strip().splitlines()[-1]
  assert (tiny_run / 'metrics.json').read_text() == before
  r = _run('skinmtl_jax.evaluate', f'--workdir={tiny_run}', '--datasets=test')
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'Evaluated synthetic_test: 12 images in' in r.stderr
  assert set(json.loads((tiny_run / 'metrics.json').read_text())) >= {'test', 'params'}


def test_evaluate_and_predict_in_bfloat16_leave_the_run_alone(tiny_run, tmp_path):
  """--dtype=bfloat16 on a float32 run: evaluate writes into RUN/eval_bfloat16 (the run's
  metrics.json untouched) and measures what the run measured, within bfloat16's rounding;
  predict gives the same probabilities within it."""
  before = (tiny_run / 'metrics.json').read_text()
  r = _run('skinmtl_jax.evaluate', f'--workdir={tiny_run}', '--dtype=bfloat16')
  assert r.returncode == 0, r.stderr[-3000:]
  assert (tiny_run / 'metrics.json').read_text() == before
  ours, run = (json.loads(p.read_text()) for p in (tiny_run / 'eval_bfloat16' / 'metrics.json',
                                                  tiny_run / 'metrics.json'))
  assert ours['compute_dtype'] == 'bfloat16' and 'compute_dtype' not in run
  assert ours['steps'] == run['steps']
  assert abs(ours['test']['dice'] - run['test']['dice']) < 0.02
  assert (tiny_run / 'eval_bfloat16' / 'report.md').exists()
  image = tmp_path / 'lesion.png'
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8)).save(image)
  probs = []
  for dtype in ('float32', 'bfloat16'):
    r = _run('skinmtl_jax.predict', f'--workdir={tiny_run}', f'--out={tmp_path / dtype}',
             f'--dtype={dtype}', str(image))
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads(r.stdout.strip().splitlines()[-1])
    assert record['compute_dtype'] == dtype
    probs.append(record['melanoma_prob'])
  assert probs[0] != probs[1] and abs(probs[0] - probs[1]) < 0.02, probs  # computed in bfloat16


def test_predict_decides_at_the_operating_point_and_says_how_sure_it_is(tiny_run, tmp_path):
  """The decision is at decision.json's operating point, named; one member without --tta has
  no uncertainty (null, and why), with --tta its 8 views are the opinions: the measures, the
  map at the image's size, and the record says what the thresholds were fitted on."""
  decision = json.loads((tiny_run / 'decision.json').read_text())
  op = decision['operating_point']
  rng = np.random.default_rng(1)
  paths = []
  for i, size in enumerate(((40, 50), (64, 48), (33, 71))):
    paths.append(tmp_path / f'lesion{i}.png')
    Image.fromarray(rng.integers(0, 255, (*size, 3), np.uint8)).save(paths[-1])
  r = _run('skinmtl_jax.predict', f'--workdir={tiny_run}', f'--out={tmp_path / "plain"}',
           *map(str, paths))
  assert r.returncode == 0, r.stderr[-3000:]
  for rec in (json.loads(l) for l in r.stdout.splitlines() if l.startswith('{')):
    assert rec['decision_threshold'] == op['threshold']
    assert rec['decision'] == ('melanoma' if rec['melanoma_prob'] >= op['threshold']
                               else 'benign')
    assert rec['operating_point'].startswith('melanoma sensitivity 0.90 on the validation split')
    assert rec['uncertainty'] is None and 'one opinion' in rec['uncertainty_unavailable']
    assert 'uncertainty_map' not in rec and isinstance(rec['review'], bool)
    assert '3 images' in rec['decision_fitted_on']
  r = _run('skinmtl_jax.predict', f'--workdir={tiny_run}', f'--out={tmp_path / "tta"}', '--tta',
           *map(str, paths))
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'decision_fitted_on' in r.stderr                    # fitted on single views: said
  for rec, path in zip((json.loads(l) for l in r.stdout.splitlines() if l.startswith('{')),
                       paths):
    u = rec['uncertainty']
    assert u['opinions'] == 8 and u['opinions_are'] == 'views'
    assert 0 <= u['mask_dice_between'] <= 1 and 0 <= u['mutual_information'] <= 1
    assert 0 <= u['votes_melanoma'] <= 8 and u['melanoma_prob_range'] >= 0
    with Image.open(path) as im, Image.open(rec['uncertainty_map']) as m:
      assert m.size[0] == im.size[0] + 64 and m.size[1] >= im.size[1]   # map + colour bar
    # The mask threshold was fitted on members; one member's views leave it unchecked.
    assert any(x.startswith('mask_agreement:') for x in rec['review_not_checked'])
