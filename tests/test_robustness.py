"""Nothing lost, nothing silently wrong (issue 17): reruns with another config, two runs in one
workdir, damaged checkpoints, SIGTERM outside the train loop, config values refused up front,
command lines given a wrong folder, odd image files, symlinked downloads and scalars.jsonl after
a resume. Command lines are run as subprocesses: their exit code, their one-line message and
the absence of a traceback are what a user sees."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, tiny_config
from helpers import (assert_same_state, cpu_env, final_state, main_args, run_main, run_module,
                     start_main, wait_for_step)
from skinmtl_jax import calibration as calibration_lib
from skinmtl_jax import checkpointing, config_base, preemption, saved_run, steps, workdir, writers
from skinmtl_jax.config_base import ConfigError
from skinmtl_jax.datasets import files

def _assert_refused(r, *phrases, code=1):
  assert r.returncode == code, (r.returncode, r.stderr[-3000:])
  assert 'Traceback' not in r.stderr, r.stderr[-3000:]
  for p in phrases:
    assert p in r.stderr, (p, r.stderr[-3000:])


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A finished tiny run (checkpoints of steps 3 and 6, metrics.json); copy it to change it."""
  run = tmp_path_factory.mktemp('trained') / 'run'
  r = run_main(run, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return run


def _copy(run, tmp_path, name='run'):
  dst = tmp_path / name
  shutil.copytree(run, dst)
  return dst


def _snapshot(run):
  return {n: (run / n).read_bytes() for n in ('config.json', 'metrics.json', 'report.md')}


# ------------------------------------------------------------------ 1. rerun, changed config

def test_rerun_with_another_architecture_is_refused_and_leaves_the_run_intact(trained, tmp_path):
  run = _copy(trained, tmp_path)
  before = _snapshot(run)
  r = run_main(run, '--config.model.features=(4,8,8,32)')
  _assert_refused(r, 'model.features', '[4, 8, 8, 16] -> [4, 8, 8, 32]', 'new --workdir',
                  'num_train_steps')
  assert _snapshot(run) == before
  assert sorted(os.listdir(run / 'checkpoints')) == ['3', '6']
  _, _, state = saved_run.load_run(str(run))  # predict and evaluate still work on it
  assert steps.step_of(state) == 6


def test_which_config_changes_a_rerun_may_make(trained, tmp_path):
  run = _copy(trained, tmp_path)
  refused = [('batch_size', 8), ('num_seeds', 2), ('seed', 1), ('optim.learning_rate', 1e-3),
             ('data.image_size', (64, 64)), ('model.arch', 'resnet50'), ('data.name', 'isic2016')]
  for field, value in refused:
    cfg = tiny_config()
    holder, key = (cfg, field) if '.' not in field else (cfg[field.split('.')[0]],
                                                          field.split('.')[1])
    holder[key] = value
    with pytest.raises(ConfigError, match=field.replace('.', r'\.')):
      workdir.check_and_save_config(cfg, str(run))
  cfg = tiny_config()
  cfg.num_train_steps, cfg.log_every_steps, cfg.data.eval_sets = 60, 5, ('test', 'test')
  cfg.data.manual_dir, cfg.threshold = '/elsewhere', 0.4
  cfg.model.conv_impl = 'xla'   # how the convolutions compute, not what
  workdir.check_and_save_config(cfg, str(run))
  assert json.loads((run / 'config.json').read_text())['num_train_steps'] == 60
  # A field that the saved config lacks (added to the code since) is not a change.
  saved = json.loads((run / 'config.json').read_text())
  del saved['data']['num_workers']
  (run / 'config.json').write_text(json.dumps(saved))
  workdir.check_and_save_config(tiny_config(), str(run))
  # A workdir that never got as far as a checkpoint may be reused with any config.
  fresh = tmp_path / 'fresh'
  workdir.check_and_save_config(tiny_config(), str(fresh))
  cfg = tiny_config()
  cfg.batch_size = 8
  workdir.check_and_save_config(cfg, str(fresh))


# ---------------------------------------------------------------- 5. two runs in one workdir

def test_a_second_run_in_the_same_workdir_is_refused(trained, tmp_path):
  run = _copy(trained, tmp_path)
  before = _snapshot(run)
  # The first: the finished run resumed for more steps (a change a rerun may make).
  log = open(tmp_path / 'first.log', 'w+', encoding='utf-8')  # a pipe would fill and block it
  first = start_main(run, '--config.num_train_steps=100000', '--config.log_every_steps=1',
                     '--config.checkpoint_every_steps=100000', stderr=log)
  try:
    wait_for_step(first, run, 8, log=tmp_path / 'first.log', poll=0.1)
    second = run_main(run, '--config.seed=1')
    _assert_refused(second, f'{run} is in use by another process (pid {first.pid}')
    assert first.poll() is None  # undisturbed
    first.send_signal(signal.SIGTERM)
    assert first.wait(120) == preemption.PREEMPTED_EXIT_CODE
  finally:
    if first.poll() is None:
      first.kill()
    log.close()
  # The first run's own files: its config (seed 0, more steps), its new checkpoint, and the
  # metrics of the finished run it continued (not yet re-evaluated).
  config = json.loads((run / 'config.json').read_text())
  assert config['seed'] == 0 and config['num_train_steps'] == 100000
  assert (run / 'metrics.json').read_bytes() == before['metrics.json']
  steps_saved = sorted(int(s) for s in os.listdir(run / 'checkpoints') if s.isdigit())
  assert steps_saved[:2] == [3, 6] and steps_saved[-1] > 8


# --------------------------------------------------------------- 6. damaged latest checkpoint

def _damage(run, step):
  """Truncates the largest array file of the checkpoint of `step` to half its length."""
  data = [p for p in (run / 'checkpoints' / str(step)).rglob('*') if p.is_file()
          and 'ocdbt.process_0' in str(p)]
  big = max(data, key=lambda p: p.stat().st_size)
  big.write_bytes(big.read_bytes()[:big.stat().st_size // 2])


def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(trained, tmp_path):
  run = _copy(trained, tmp_path)
  _damage(run, 6)
  _, _, state = saved_run.load_run(str(run))
  assert steps.step_of(state) == 3
  (run / 'checkpoints' / '3' / 'state' / '_METADATA').unlink()  # and one without metadata
  r = run_module('skinmtl_jax.predict', f'--workdir={run}', f'--out={tmp_path / "out"}', 'x.png')
  _assert_refused(r, 'None of the checkpoints', str(run / 'checkpoints'))


def test_non_finite_weights_are_taken_for_damage(trained, tmp_path):
  run = _copy(trained, tmp_path)
  _, _, state = saved_run.load_run(str(run))
  bad = state.replace(step=state.step + 3,
                      params=jax.tree.map(lambda x: x * np.nan, state.params))
  manager = checkpointing.create_manager(str(run))
  checkpointing.save(manager, bad)
  manager.wait_until_finished()
  assert manager.latest_step() == 9
  manager.close()
  _, _, state = saved_run.load_run(str(run))
  assert steps.step_of(state) == 6
  assert np.isfinite(np.asarray(jax.tree.leaves(state.params)[0])).all()


def test_training_resumes_from_the_newest_intact_checkpoint(trained, tmp_path):
  run = _copy(trained, tmp_path)
  _damage(run, 6)
  r = run_main(run, '--config.num_train_steps=9', timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'checkpoints/6 cannot be restored' in r.stderr
  assert 'Restored the checkpoint of step 3' in r.stderr
  assert json.loads((run / 'metrics.json').read_text())['steps'] == 9
  assert [p.name.split('.')[0] for p in (run / 'checkpoints_damaged').iterdir()] == ['6']
  manager = checkpointing.create_manager(str(run), read_only=True)
  assert manager.all_steps() == [3, 6, 9]  # step 6 trained and saved again
  manager.close()
  _, _, state = saved_run.load_run(str(run), step=6)
  assert steps.step_of(state) == 6


# ---------------------------------------------------------- 7. SIGTERM outside the train loop

_SIGTERM_AT = """
import os, signal, sys, time
from absl import app
from skinmtl_jax import evaluate, input_pipeline, main, parallel
module, name = {'start': (parallel, 'maybe_initialize_distributed'),
                'setup': (input_pipeline, 'get_split'),
                'evaluation': (evaluate, 'evaluate_and_report')}[sys.argv.pop(1)]
def term(*args, **kwargs):
  os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(60)
setattr(module, name, term)
app.run(main.main)
"""


@pytest.mark.parametrize('where', ['start', 'setup', 'evaluation'])
def test_sigterm_outside_the_train_loop_exits_75_with_a_message(trained, tmp_path, where):
  run = _copy(trained, tmp_path)
  before = _snapshot(run)
  r = subprocess.run([sys.executable, '-c', _SIGTERM_AT, where, *main_args(run)], cwd=ROOT,
                     env=cpu_env(), capture_output=True, text=True, timeout=300)
  _assert_refused(r, 'SIGTERM', 'run the same command again', code=preemption.PREEMPTED_EXIT_CODE)
  assert _snapshot(run) == before
  assert sorted(os.listdir(run / 'checkpoints')) == ['3', '6']


_SIGTERM_AT_THE_LAST_SAVE = """
import os, signal, sys, time
from absl import app
import orbax.checkpoint as ocp
from skinmtl_jax import main
wait = ocp.CheckpointManager.wait_until_finished
def term_then_wait(self):
  if sys._getframe(1).f_code.co_name == '_train_and_evaluate':  # after the loop, not in a save
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)  # the signal lands here, while the last save may be in flight
  return wait(self)
ocp.CheckpointManager.wait_until_finished = term_then_wait
app.run(main.main)
"""


def test_sigterm_while_the_last_checkpoint_is_finished_lets_it_finish(tmp_path):
  """SIGTERM after the last step, while its checkpoint is written: 75 once that checkpoint is
  complete (raised inside orbax's wait it would cut the save short, and orbax would log it as a
  failed save); running again evaluates."""
  r = subprocess.run([sys.executable, '-c', _SIGTERM_AT_THE_LAST_SAVE, *main_args(tmp_path)],
                     cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
  _assert_refused(r, 'at or after the last training step', 'run the same command again',
                  code=preemption.PREEMPTED_EXIT_CODE)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3', '6']
  assert steps.step_of(final_state(tmp_path)) == 6
  assert not (tmp_path / 'metrics.json').exists()
  r = run_main(tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads((tmp_path / 'metrics.json').read_text())['steps'] == 6


_SIGTERM_IN_THE_LAST_STEP = """
import os, signal, sys, time
from absl import app
from skinmtl_jax import main, preemption
reached = preemption.SigtermFlag.reached
def reached_then_term(self, step):
  out = reached(self, step)
  if step == 6:  # the last step, after its flag was read
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)
  return out
preemption.SigtermFlag.reached = reached_then_term
app.run(main.main)
"""


def test_sigterm_in_the_last_step_is_not_ignored(tmp_path):
  """SIGTERM in the last step, after the loop read its flag: 75 with that step's checkpoint
  (it used to be ignored: the run went on to evaluate, which a cluster's SIGKILL may cut)."""
  r = subprocess.run([sys.executable, '-c', _SIGTERM_IN_THE_LAST_STEP, *main_args(tmp_path)],
                     cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
  _assert_refused(r, 'at or after the last training step', 'run the same command again',
                  code=preemption.PREEMPTED_EXIT_CODE)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3', '6']
  assert not (tmp_path / 'metrics.json').exists()


# --------------------------------------------------------------- 8. config values refused

@pytest.mark.parametrize('field,value,match', [
    ('num_epochs', -3, 'num_epochs=-3'), ('max_checkpoints_to_keep', 0, 'max_checkpoints'),
    ('optim.learning_rate', 0.0, 'optim.learning_rate'),
    ('optim.final_learning_rate', -1.0, 'optim.final_learning_rate'),
    ('checkpoint_every_steps', 0, 'checkpoint_every_steps'),
    ('log_every_steps', 0, 'log_every_steps'), ('threshold', 2.0, 'threshold'),
    ('threshold', 0.0, 'threshold'), ('data.image_size', (32,), r'data\.image_size'),
    ('data.image_size', (0, 0), r'data\.image_size'),
    ('data.image_size', (36, 32), 'multiples of 8'), ('model.features', (), 'model.features'),
    ('model.features', (4, 8, 0), 'model.features'),
    ('model.features', (4, 8), 'model.features'), ('num_seeds', 10_000, 'num_seeds'),
    ('data.on_device', 'yes', 'data.on_device'),
    ('data.on_device_fraction', 0.0, 'data.on_device_fraction'),
    ('data.prefetch_batches', -1, 'data.prefetch_batches'),
    ('member_loop', 'loop', 'member_loop'),
])
def test_config_values_that_make_no_sense_are_refused(field, value, match):
  cfg = tiny_config()
  if field == 'num_epochs':
    cfg.num_train_steps = -1
  parts = field.split('.')
  holder = cfg if len(parts) == 1 else cfg[parts[0]]
  holder[parts[-1]] = value
  with pytest.raises(ConfigError, match=match):
    config_base.validate_config(cfg)


def test_config_mistakes_on_the_command_line_end_in_one_line(tmp_path):
  r = run_main(tmp_path / 'x', '--config.model.widht=3')
  _assert_refused(r, '--config.model.widht', 'model.resnet_width')
  r = run_main(tmp_path / 'x', '--config.model.weight_grad=xla')
  _assert_refused(r, '--config.model.weight_grad', "it is 'model.conv_impl' now")
  r = run_main(tmp_path / 'x', '--config.num_train_steps=-1', '--config.num_epochs=-3')
  _assert_refused(r, 'num_epochs=-3')
  assert not (tmp_path / 'x').exists()


# ---------------------------------------------------------- 9. command lines, wrong workdir

def test_command_lines_given_a_wrong_workdir_say_so_in_one_line(trained, tmp_path):
  missing, empty, untrained = tmp_path / 'missing', tmp_path / 'empty', tmp_path / 'untrained'
  empty.mkdir()
  untrained.mkdir()
  shutil.copy(trained / 'config.json', untrained)
  out = f'--out={tmp_path / "out"}'
  cases = [('skinmtl_jax.predict', missing, [out, 'x.png'], 'is not a folder'),
           ('skinmtl_jax.predict', empty, [out, 'x.png'], 'config.json not found'),
           ('skinmtl_jax.evaluate', missing, [], 'is not a folder'),
           ('skinmtl_jax.evaluate', untrained, [], 'has no checkpoint yet'),
           ('skinmtl_jax.grad_study', untrained, [out], 'has no checkpoint yet')]
  for module, where, args, phrase in cases:
    r = run_module(module, f'--workdir={where}', *args)
    _assert_refused(r, str(where), phrase)
  assert not missing.exists() and not (tmp_path / 'out').exists()


# ------------------------------------------------------ 3, 4. odd images and predict outputs

def _png(arr) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format='PNG')
  return buf.getvalue()


def test_16_bit_images_are_scaled_not_white():
  gray = np.full((6, 8), 30000, np.uint16)
  gray[0, 0] = 65535
  img = files.decode_image(_png(gray), 'g16.png', mode='RGB')
  arr = np.asarray(img)
  assert arr[1, 1].tolist() == [117, 117, 117] and arr[0, 0].tolist() == [255, 255, 255]
  mask = np.zeros((6, 8), np.uint16)
  mask[2:4, 2:6] = 65535
  folder = files.Folder('masks', {'m.png': 'm.png'}, None)
  folder.read_bytes = lambda name: _png(mask)
  np.testing.assert_array_equal(files.load_mask(folder, 'm.png', (6, 8)), mask // 65535)


def test_exif_orientation_is_applied():
  arr = np.zeros((10, 20, 3), np.uint8)
  arr[:, :5] = 255  # white on the left
  exif = Image.Exif()
  exif[0x0112] = 6  # viewers rotate this 90 degrees clockwise
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format='JPEG', exif=exif.tobytes(), quality=95)
  img = np.asarray(files.decode_image(buf.getvalue(), 'r.jpg', mode='RGB'))
  assert img.shape == (20, 10, 3)
  assert img[:5].mean() > 200 and img[-5:].mean() < 50  # the white strip is now on top


def test_a_training_image_and_its_mask_are_turned_alike():
  """A square image with an EXIF rotation: the lesion in the prepared image is where the
  prepared mask marks it (the image turned upright, its mask by the same turn)."""
  arr = np.zeros((16, 16, 3), np.uint8)
  arr[:4, :8] = 255  # the 'lesion', top left as stored
  mask = np.zeros((16, 16), np.uint8)
  mask[:4, :8] = 255
  exif = Image.Exif()
  exif[0x0112] = 6
  jpg, png = io.BytesIO(), io.BytesIO()
  Image.fromarray(arr).save(jpg, format='JPEG', exif=exif.tobytes(), quality=95)
  Image.fromarray(mask).save(png, format='PNG')
  images = files.Folder('images', {'x.jpg': 'x.jpg'}, None)
  images.read_bytes = lambda name: jpg.getvalue()
  masks = files.Folder('masks', {'x.png': 'x.png'}, None)
  masks.read_bytes = lambda name: png.getvalue()
  img, m = files.load_pair(images, 'x.jpg', masks, 'x.png', (16, 16))
  lesion = img.mean(axis=-1) > 128
  assert (lesion == (m == 1)).mean() > 0.97
  assert not np.array_equal(m, mask // 255)   # turned (upright), not as stored
  assert m[:, -4:].sum() == 32                # rotated clockwise: the right edge


def test_an_image_too_large_to_read_names_the_limit():
  buf = io.BytesIO()
  Image.new('1', (20000, 20000)).save(buf, format='PNG')
  with pytest.raises(files.DataError, match='too large to read safely.*pixels are read'):
    files.decode_image(buf.getvalue(), 'huge.png', mode='RGB')


def test_predict_gives_every_input_its_own_outputs(trained, tmp_path):
  rng = np.random.default_rng(0)
  images = tmp_path / 'images'
  paths = [images / 'a' / 'same.jpg', images / 'b' / 'same.jpg', images / 'c.jpg',
           images / 'c.png', images / 'g16.png']
  for p in paths[:4]:
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(p)
  paths[4].write_bytes(_png(np.full((40, 30), 20000, np.uint16)))
  out = tmp_path / 'out'
  r = run_module('skinmtl_jax.predict', f'--workdir={trained}', f'--out={out}', *map(str, paths))
  assert r.returncode == 0, r.stderr[-3000:]
  r2 = run_module('skinmtl_jax.predict', f'--workdir={trained}', f'--out={out}', str(paths[0]))
  assert r2.returncode == 0, r2.stderr[-3000:]
  lines = [json.loads(l) for l in (out / 'predictions.jsonl').read_text().splitlines()]
  assert len(lines) == 6
  masks = [l['mask'] for l in lines[:5]]
  assert len(set(masks)) == 5 and all(os.path.exists(m) for m in masks)
  assert len({l['overlay'] for l in lines[:5]}) == 5
  assert lines[5]['mask'] == lines[0]['mask']  # the same image again: its own outputs again
  assert len({l['invocation'] for l in lines[:5]}) == 1 != len({l['invocation'] for l in lines})
  for p, l in zip(paths, lines):
    with Image.open(l['mask']) as m:
      assert m.size == (30, 40)
    assert l['image_abspath'] == str(p)


# ----------------------------------------------------------------- 2. symlinked downloads

def test_symlinked_download_folders_are_found_and_link_loops_end(tmp_path):
  real = tmp_path / 'elsewhere' / 'isic2016'
  (real / 'ISBI2016_ISIC_Part1_Training_Data').mkdir(parents=True)
  (real / 'ISBI2016_ISIC_Part1_Training_Data' / 'ISIC_0000000.jpg').write_bytes(b'x')
  (real / 'labels.csv').write_text('ISIC_0000000,benign\n')
  manual = tmp_path / 'downloads'
  (manual / 'more').mkdir(parents=True)
  (manual / 'isic2016').symlink_to(real, target_is_directory=True)
  (manual / 'more' / 'loop').symlink_to(manual, target_is_directory=True)
  folder = files.find_folder(str(manual), 'ISBI2016_ISIC_Part1_Training_Data')
  assert folder.names() == ['ISIC_0000000.jpg']
  assert files.find_file(str(manual), 'labels.csv').read_text().startswith('ISIC_0000000')
  with pytest.raises(files.DataError, match='Neither a folder'):
    files.find_folder(str(manual), 'ISBI2016_ISIC_Part1_Test_Data')


# ------------------------------------------------------------ 10. scalars.jsonl on a resume

def test_scalars_jsonl_keeps_every_row_once_across_a_resume(tmp_path):
  path, ckpt = tmp_path / 'scalars.jsonl', tmp_path / 'checkpoints'
  w = writers.JsonlWriter(str(path), checkpoint_dir=str(ckpt))
  for step in (2, 4, 6, 8):
    w.write_scalars(step, {'train/loss': step})
    # On disk at once: a SIGKILL now loses nothing.
    assert json.loads(path.read_text().splitlines()[-1])['step'] == step
  with open(path, 'a', encoding='utf-8') as f:
    f.write('{"step": 9, "train/lo')  # cut off by the kill
  for s in ('3', '6', '9.orbax-checkpoint-tmp-1'):
    (ckpt / s).mkdir(parents=True)
  # The killed run resumes from step 6 and writes steps 8 and 10 again.
  w = writers.JsonlWriter(str(path), checkpoint_dir=str(ckpt))
  for step in (8, 10):
    w.write_scalars(step, {'train/loss': step})
  w.close()
  assert [json.loads(l)['step'] for l in path.read_text().splitlines()] == [2, 4, 6, 8, 10]


def test_sigterm_at_any_moment_of_the_start_exits_75(tmp_path):
  """SIGTERM while Python imports, while the flags are parsed, while the data and the model are
  set up: always 75 (cluster requeue), never a crash or a signal's own status."""
  codes = []
  for i, delay in enumerate((0.3, 1.5, 3.0, 4.5, 6.0, 8.0)):
    p = start_main(tmp_path / f'r{i}')
    time.sleep(delay)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    codes.append(p.returncode)
    assert p.returncode in (preemption.PREEMPTED_EXIT_CODE, 0), (delay, p.returncode, err[-2000:])
    if p.returncode:
      assert 'SIGTERM' in err.strip().splitlines()[-1] and 'Traceback' not in err
  assert codes.count(preemption.PREEMPTED_EXIT_CODE) >= 4, codes


# ------------------------------------------ 9. nothing silently wrong after a resume (issue 27)

def test_a_resume_on_other_training_examples_is_refused_by_name(trained, tmp_path):
  run = _copy(trained, tmp_path)
  record = json.loads((run / 'training_set.json').read_text())
  assert len(record['examples']) == 21 and len(record['validation']) == 3
  # As if the data the run reads had changed (another data_dir, another preparation): one
  # example more, one relabelled.
  record['examples'] = record['examples'][:-1] + [[record['examples'][-1][0], 1 - record[
      'examples'][-1][1]]]
  record['examples'].append(['synthetic_train_999', 0])
  record['sha256'] = 'changed'
  (run / 'training_set.json').write_text(json.dumps(record))
  before = _snapshot(run)
  r = run_main(run, '--config.num_train_steps=9')
  _assert_refused(r, 'trained on other examples', '1 removed (synthetic_train_999)',
                  '1 relabelled', 'new --workdir')
  assert _snapshot(run) == before        # config.json is not rewritten by a refused rerun
  diff = workdir.training_set_difference(record, {**record, 'sha256': 'x', 'examples': list(
      reversed(record['examples']))})
  assert diff == 'the same examples in another order'


def test_a_fresh_start_drops_the_previous_runs_calibration(trained, tmp_path):
  run = tmp_path / 'reused'
  run.mkdir()
  shutil.copy(trained / 'calibration.json', run)        # left by a run that never saved
  r = run_main(run, '--config.data.validation_fraction=0')
  assert r.returncode == 0, r.stderr[-3000:]
  assert not (run / 'calibration.json').exists()
  m = json.loads((run / 'metrics.json').read_text())
  assert m['calibration'] is None and 'calibrated' not in m['test']


@pytest.mark.parametrize('temperature', [float('nan'), 0.0, -1.0, 'x', 0.01])
def test_an_invalid_calibration_is_not_applied(trained, tmp_path, temperature, caplog):
  run = _copy(trained, tmp_path)
  c = json.loads((run / 'calibration.json').read_text())
  assert len(c['model']) == 64                           # tied to its model's fingerprint
  good = calibration_lib.load(str(run), c['step'], c['model'])
  assert good['temperature'] == c['temperature']
  c['temperature'] = temperature
  (run / 'calibration.json').write_text(json.dumps(c))
  assert calibration_lib.load(str(run), c['step'], c['model']) is None
  assert 'no calibration applied' in caplog.text


def test_a_calibration_is_applied_only_to_the_model_it_was_fitted_on(trained, tmp_path, caplog):
  c = json.loads((trained / 'calibration.json').read_text())
  assert calibration_lib.load(str(trained), c['step'], 'another model') is None
  assert 'fitted for another model' in caplog.text


def test_a_fit_on_a_few_separable_images_stops_at_the_temperature_floor(caplog):
  c = calibration_lib.fit(np.array([0, 0, 1, 1]), np.array([0.49, 0.495, 0.505, 0.51]))
  assert c['temperature'] == pytest.approx(calibration_lib.T_MIN)
  assert c['at_bound'] == ['temperature'] and 'reached the bound' in caplog.text


def test_predict_says_when_there_is_no_calibration_and_records_its_mode(trained, tmp_path):
  run = _copy(trained, tmp_path)
  image = tmp_path / 'x.png'
  Image.fromarray(np.full((40, 30, 3), 120, np.uint8)).save(image)
  r = run_module('skinmtl_jax.predict', f'--workdir={run}', f'--out={tmp_path / "a"}', '--tta',
                 str(image))
  assert r.returncode == 0, r.stderr[-3000:]
  line = json.loads(r.stdout.strip().splitlines()[-1])
  assert line['tta'] is True and line['compute_dtype'] == 'float32'
  assert 'single-view float32' in line['calibration_fitted_on']
  assert 'applied to TTA-averaged float32 outputs' in r.stderr
  (run / 'calibration.json').unlink()
  r = run_module('skinmtl_jax.predict', f'--workdir={run}', f'--out={tmp_path / "b"}', str(image))
  assert r.returncode == 0 and 'calibration.json not found: no calibrated probability' in r.stderr
  assert 'melanoma_prob_calibrated' not in json.loads(r.stdout.strip().splitlines()[-1])


def test_changing_the_input_workers_resumes_bit_exactly(tmp_path):
  args = ('--config.data.on_device=off', '--config.checkpoint_every_steps=3')
  straight = tmp_path / 'straight'
  r = run_main(straight, *args, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  run = _copy(straight, tmp_path, 'resumed')
  shutil.rmtree(run / 'checkpoints' / '6')
  (run / 'metrics.json').unlink()
  r = run_main(run, *args, '--config.data.num_workers=2', timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'Resumed from step 3' in r.stderr
  _, _, a = saved_run.load_run(str(straight))
  _, _, b = saved_run.load_run(str(run))
  assert_same_state(a, b)


def test_a_checkpoint_rotated_away_while_read_is_tried_again_not_called_damaged(
    trained, tmp_path, monkeypatch, caplog):
  caplog.set_level('INFO')
  run = _copy(trained, tmp_path)
  real = checkpointing._restore_step  # pylint: disable=protected-access

  def rotating(manager, template, step):
    if step == 6 and (run / 'checkpoints' / '6').exists():  # a training run rotates 6 away
      shutil.rmtree(run / 'checkpoints' / '6')
      (run / 'checkpoints' / '9').mkdir()                     # ... after saving 9 (a copy of 3)
      shutil.copytree(run / 'checkpoints' / '3', run / 'checkpoints' / '9', dirs_exist_ok=True)
      raise FileNotFoundError('gone while reading')
    return real(manager, template, step)
  monkeypatch.setattr(checkpointing, '_restore_step', rotating)
  _, _, state = saved_run.load_run(str(run))
  assert steps.step_of(state) == 3        # the copy saved as 9 holds step 3's state
  assert 'removed while it was read' in caplog.text and 'damaged' not in caplog.text


def test_a_longer_schedule_and_another_threshold_are_said_and_recorded(trained, tmp_path):
  run = _copy(trained, tmp_path)
  r = run_main(run, '--config.num_train_steps=9', '--config.threshold=0.4', timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'the learning rate decays over the new total' in r.stderr
  m = json.loads((run / 'metrics.json').read_text())
  assert m['lr_schedule_restretched'] == {'at_step': 6, 'from_total': 6, 'to_total': 9}
  assert 'threshold 0.5 -> 0.4' in r.stderr
  assert "our decisions at the threshold 0.4, the paper's at 0.5" in (run / 'report.md').read_text()


@pytest.mark.parametrize('saved', [[], {}, {'data': {}}, {'model': 'x', 'data': {}}])
def test_a_malformed_config_json_ends_in_one_line(trained, tmp_path, saved):
  run = _copy(trained, tmp_path)
  (run / 'config.json').write_text(json.dumps(saved))
  for module, extra in (('skinmtl_jax.evaluate', []),
                        ('skinmtl_jax.predict', [f'--out={tmp_path / "o"}', 'x.png'])):
    r = run_module(module, f'--workdir={run}', *extra)
    _assert_refused(r, 'config.json')


def test_more_mistakes_end_in_one_line(trained, tmp_path):
  r = run_module('skinmtl_jax.main', '--config=configs/nosuch.py', f'--workdir={tmp_path / "x"}')
  _assert_refused(r, '--config=configs/nosuch.py: no such file')
  for field in ('model.cls_hidden', 'model.cbam_reduction'):
    r = run_main(tmp_path / 'y', f'--config.{field}=0')
    _assert_refused(r, f'{field}=0')
  for size in ('abc', '0x0', '32', '-32x32'):
    r = run_module('skinmtl_jax.prepare', '--dataset=isic2016', f'--manual_dir={tmp_path}',
                   f'--size={size}')
    _assert_refused(r, f'--size={size}: expected the height and width')
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  r = run_module('skinmtl_jax.predict', f'--workdir={trained}', f'--out={a_file}', 'x.png')
  _assert_refused(r, 'is a file, not a folder')
  r = run_module('skinmtl_jax.predict', f'--workdir={trained}',
                 f'--out={trained / "checkpoints" / "6" / "out"}', 'x.png')
  _assert_refused(r, 'which the run rotates')
  assert not (trained / 'checkpoints' / '6' / 'out').exists()
  r = run_module('skinmtl_jax.evaluate', f'--workdir={trained}', '--datasets=nosuch')
  _assert_refused(r, "--datasets names 'nosuch'", 'evaluation sets test')


def test_evaluate_into_another_folder_needs_no_write_access_to_the_run(trained, tmp_path):
  run = _copy(trained, tmp_path)
  os.chmod(run, 0o555)
  try:
    # Root ignores permissions: a read-only run is one whose lock cannot be taken.
    with open(run / '.lock', 'w', encoding='utf-8') as f:
      import fcntl  # pylint: disable=import-outside-toplevel
      fcntl.flock(f, fcntl.LOCK_EX)  # held by "another process" (this one)
      r = run_module('skinmtl_jax.evaluate', f'--workdir={run}',
                     f'--out={tmp_path / "elsewhere"}')
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / 'elsewhere' / 'metrics.json').exists()
  finally:
    os.chmod(run, 0o755)
