"""Fault tolerance: kill and resume, SIGTERM, non-finite losses, interrupted checkpoints,
config errors and damaged image files."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, tiny_config
from skinmtl_jax import checkpointing, models, steps, train
from skinmtl_jax.datasets import files

ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
LONG = ['--config.num_train_steps=12', '--config.checkpoint_every_steps=2',
        '--config.log_every_steps=1']


def _start(workdir, *overrides):
  return subprocess.Popen([sys.executable, '-m', 'skinmtl_jax.main', '--config=configs/tiny.py',
                           f'--workdir={workdir}', *overrides], cwd=ROOT, env=ENV,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _logged_step(workdir):
  path = os.path.join(workdir, 'scalars.jsonl')
  if not os.path.exists(path):
    return 0
  steps_seen = [json.loads(l)['step'] for l in open(path) if 'train/loss' in l]
  return max(steps_seen, default=0)


def _wait_for_step(proc, workdir, step, timeout=300):
  t = time.time()
  while _logged_step(workdir) < step:
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() - t < timeout
    time.sleep(0.05)


def _final_state(workdir, num_steps):
  cfg = tiny_config()
  model = models.create_model(cfg.model)
  template = steps.create_train_state(model, train.create_optimizer(cfg, num_steps),
                                      steps.member_keys(0, 1), tuple(cfg.data.image_size))
  manager = checkpointing.create_manager(str(workdir), read_only=True)
  try:
    return checkpointing.restore(manager, template)
  finally:
    manager.close()


def _assert_same_state(a, b):
  for x, y in zip(jax.tree.leaves((a.step, a.params, a.batch_stats, a.opt_state)),
                  jax.tree.leaves((b.step, b.params, b.batch_stats, b.opt_state))):
    np.testing.assert_array_equal(x, y)


def test_sigkill_at_a_random_step_then_restart_ends_bit_identical(tmp_path):
  full = _start(tmp_path / 'full', *LONG)
  assert full.wait(600) == 0, full.stderr.read()[-3000:]
  kill_at = int(np.random.default_rng().integers(3, 11))
  proc = _start(tmp_path / 'killed', *LONG)
  _wait_for_step(proc, tmp_path / 'killed', kill_at)
  proc.send_signal(signal.SIGKILL)
  proc.wait(60)
  again = _start(tmp_path / 'killed', *LONG)
  assert again.wait(600) == 0, again.stderr.read()[-3000:]
  _assert_same_state(_final_state(tmp_path / 'full', 12), _final_state(tmp_path / 'killed', 12))


def test_sigterm_saves_and_exits_with_the_documented_code(tmp_path):
  workdir = tmp_path / 'run'
  proc = _start(workdir, '--config.num_train_steps=400', '--config.checkpoint_every_steps=1000',
                '--config.log_every_steps=1')
  _wait_for_step(proc, workdir, 3)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(300) == train.PREEMPTED_EXIT_CODE == 75
  saved = sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())
  assert len(saved) == 1 and 3 <= saved[0] < 400
  assert not (workdir / 'metrics.json').exists()


def test_non_finite_loss_stops_the_run_and_keeps_the_prior_checkpoint(tmp_path, monkeypatch):
  real = steps.train_step

  def nan_at_step_5(state, batch, **kw):
    new, m = real(state, batch, **kw)
    m = dict(m)
    m['dice_loss'] = jnp.where(new.step == 5, jnp.nan, m['dice_loss'])
    return new, m

  monkeypatch.setattr(steps, 'train_step', nan_at_step_5)
  cfg = tiny_config()
  cfg.num_train_steps, cfg.checkpoint_every_steps, cfg.log_every_steps = 8, 2, 3
  with pytest.raises(FloatingPointError, match=r'Step 5: dice_loss=nan.*step 4\)'):
    train.train_and_evaluate(cfg, str(tmp_path))
  manager = checkpointing.create_manager(str(tmp_path), read_only=True)
  assert manager.all_steps() == [2, 4]
  manager.close()


def test_an_interrupted_checkpoint_write_leaves_the_previous_one_restorable(tmp_path):
  r = subprocess.run([sys.executable, '-m', 'skinmtl_jax.main', '--config=configs/tiny.py',
                      f'--workdir={tmp_path}'], cwd=ROOT, env=ENV, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  ckpt = tmp_path / 'checkpoints'
  # What a crash in the middle of writing step 9 leaves: orbax's temporary folder, half full.
  partial = ckpt / '9.orbax-checkpoint-tmp-1234'
  shutil.copytree(ckpt / '6', partial)
  shutil.rmtree(partial / 'state')
  state = _final_state(tmp_path, 6)
  assert checkpointing.step_of(state) == 6


def test_config_errors_stop_before_any_work(tmp_path):
  for override, expected in [('--config.model.reverse=True', 'model.classify'),
                             ('--config.model.no_such_field=1', 'no_such_field')]:
    r = subprocess.run([sys.executable, '-m', 'skinmtl_jax.main', '--config=configs/unet.py',
                        f'--workdir={tmp_path / "x"}', override, '--config.data.name=synthetic'],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and expected in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / 'x' / 'checkpoints').exists()


def _damaged_files(rng):
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(buf, format='PNG')
  png = buf.getvalue()
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(buf, format='JPEG')
  jpg = buf.getvalue()
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(buf, format='BMP')
  bmp = buf.getvalue()
  yield b''
  for good in (png, jpg, bmp):
    for cut in rng.integers(1, len(good) - 1, 12):
      yield good[:cut]
    for _ in range(6):  # a few flipped bytes in the header
      bad = bytearray(good)
      for i in rng.integers(0, min(64, len(bad)), 4):
        bad[i] ^= 0xFF
      yield bytes(bad)
  for n in (1, 7, 100, 5000):
    yield rng.bytes(n)


def test_fuzzed_image_files_give_a_clear_error_every_time(tmp_path):
  from skinmtl_jax import predict as predict_lib
  rng = np.random.default_rng(0)
  predict = lambda images: {'melanoma_prob': np.zeros(len(images)),
                            'lesion_prob': np.zeros(images.shape[:3])}
  folder_dir = tmp_path / 'ISBI2016_ISIC_Part1_Training_Data'
  folder_dir.mkdir()
  start, n = time.time(), 0
  for k, data in enumerate(_damaged_files(rng)):
    path = folder_dir / f'case{k}.jpg'
    path.write_bytes(data)
    folder = files.Folder(str(folder_dir), {path.name: str(path)}, None)
    for read in (lambda: files.load_image(folder, path.name, (16, 16)),
                 lambda: files.load_mask(folder, path.name, (16, 16)),
                 lambda: predict_lib.predict_file(str(path), str(tmp_path), predict, (16, 16),
                                                  0.5, 'ckpt')):
      try:
        read()
      except files.DataError as e:
        assert path.name in str(e)
      n += 1
  assert n > 150 and time.time() - start < 60
