"""Fault tolerance: kill and resume, SIGTERM, non-finite losses, interrupted checkpoints,
config errors and damaged image files."""

import io
import os
import re
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from helpers import assert_same_state, final_state, run_main, start_main, wait_for_step
from skinmtl_jax import checkpointing, preemption, steps, train
from skinmtl_jax.datasets import files

LONG = ['--config.num_train_steps=12', '--config.checkpoint_every_steps=2',
        '--config.log_every_steps=1']


def test_sigkill_at_a_random_step_then_restart_ends_bit_identical(tmp_path):
  full = start_main(tmp_path / 'full', *LONG)
  assert full.wait(600) == 0, full.stderr.read()[-3000:]
  kill_at = int(np.random.default_rng(7).integers(3, 11))   # seeded: 8 (replayable)
  proc = start_main(tmp_path / 'killed', *LONG)
  wait_for_step(proc, tmp_path / 'killed', kill_at)
  ckpt = tmp_path / 'killed' / 'checkpoints'
  while not any(d.isdigit() for d in os.listdir(ckpt)):  # a finished checkpoint to resume
    assert proc.poll() is None
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait(60)
  again = start_main(tmp_path / 'killed', *LONG)
  _, err = again.communicate(timeout=600)
  assert again.returncode == 0, err[-3000:]
  # The restart resumed mid-run (it did not start over), and ended where the whole run ended.
  resumed = re.search(r'Resumed from step (\d+)', err)
  assert resumed and 2 <= int(resumed.group(1)) < 12, err[-3000:]
  assert_same_state(final_state(tmp_path / 'full'), final_state(tmp_path / 'killed'))


def test_sigterm_saves_and_exits_with_the_documented_code(tmp_path):
  workdir = tmp_path / 'run'
  proc = start_main(workdir, '--config.num_train_steps=400',
                    '--config.checkpoint_every_steps=1000', '--config.log_every_steps=1')
  wait_for_step(proc, workdir, 3)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(300) == preemption.PREEMPTED_EXIT_CODE == 75
  saved = sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())
  assert len(saved) == 1 and 3 <= saved[0] < 400
  assert not (workdir / 'metrics.json').exists()


@pytest.mark.parametrize('term,value', [('dice_loss', 'nan'), ('l2_grads', 'inf')])
def test_non_finite_loss_stops_the_run_and_keeps_the_prior_checkpoint(tmp_path, monkeypatch,
                                                                      term, value):
  real = steps.train_step

  def bad_at_step_5(state, batch, **kw):
    new, m = real(state, batch, **kw)
    m = dict(m)
    m[term] = jnp.where(new.step == 5, float(value), m[term])
    return new, m

  monkeypatch.setattr(steps, 'train_step', bad_at_step_5)
  cfg = tiny_config()
  cfg.num_train_steps, cfg.checkpoint_every_steps, cfg.log_every_steps = 8, 2, 3
  with pytest.raises(FloatingPointError, match=rf'Step 5: {term}={value}.*step 4\)'):
    train.train_and_evaluate(cfg, str(tmp_path))
  manager = checkpointing.create_manager(str(tmp_path), read_only=True)
  assert manager.all_steps() == [2, 4]
  manager.close()


def test_an_interrupted_checkpoint_write_leaves_the_previous_one_restorable(tmp_path):
  r = run_main(tmp_path, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  ckpt = tmp_path / 'checkpoints'
  # What a crash in the middle of writing step 9 leaves: orbax's temporary folder, half full.
  partial = ckpt / '9.orbax-checkpoint-tmp-1234'
  shutil.copytree(ckpt / '6', partial)
  shutil.rmtree(partial / 'state')
  state = final_state(tmp_path)
  assert steps.step_of(state) == 6


def test_config_errors_stop_before_any_work(tmp_path):
  for override, expected in [('--config.model.reverse=True', 'model.classify'),
                             ('--config.model.no_such_field=1', 'no_such_field')]:
    r = run_main(tmp_path / 'x', override, '--config.data.name=synthetic',
                 config='configs/unet.py')
    assert r.returncode != 0 and expected in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / 'x' / 'checkpoints').exists()


def _damaged_files(rng):
  """(bytes, must_fail): empty, truncated inside the pixel data, and random files must be
  refused; flipped header bytes may be refused or may still decode (some fields are slack)."""
  goods = []
  for fmt in ('PNG', 'JPEG', 'BMP'):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(buf, format=fmt)
    goods.append(buf.getvalue())
  yield b'', True
  for good in goods:
    # The last bytes are format trailers (PNG's IEND, BMP's row padding) without pixels.
    for cut in rng.integers(1, len(good) - 24, 12):
      yield good[:cut], True
    for _ in range(6):  # a few flipped bytes in the header
      bad = bytearray(good)
      for i in rng.integers(0, min(64, len(bad)), 4):
        bad[i] ^= 0xFF
      yield bytes(bad), False
  for n in (1, 7, 100, 5000):
    yield rng.bytes(n), True


def test_fuzzed_image_files_give_a_clear_error_every_time(tmp_path):
  """Every damaged file is refused with a DataError naming it (or, for slack header bytes,
  read as a picture of the right size); none is silently accepted and none ends otherwise."""
  from skinmtl_jax import predict as predict_lib
  rng = np.random.default_rng(0)
  predict = lambda images: {'melanoma_prob': np.zeros(len(images)),
                            'lesion_prob': np.zeros(images.shape[:3])}
  folder_dir = tmp_path / 'ISBI2016_ISIC_Part1_Training_Data'
  folder_dir.mkdir()
  start, refused, must = time.time(), 0, 0
  for k, (data, must_fail) in enumerate(_damaged_files(rng)):
    path = folder_dir / f'case{k}.jpg'
    path.write_bytes(data)
    folder = files.Folder(str(folder_dir), {path.name: str(path)}, None)
    for read in (lambda: files.load_image(folder, path.name, (16, 16)),
                 lambda: files.load_mask(folder, path.name, (16, 16)),
                 lambda: predict_lib.predict_file(str(path), str(tmp_path), predict, (16, 16),
                                                  0.5, 'ckpt')):
      must += must_fail
      try:
        out = read()
      except files.DataError as e:
        assert path.name in str(e)
        refused += 1
        continue
      assert not must_fail, f'case {k} ({len(data)} bytes) was accepted'
      if isinstance(out, np.ndarray):
        assert out.shape[:2] == (16, 16)
  assert must == 3 * (1 + 3 * 12 + 4) and refused >= must and time.time() - start < 60


def test_checkpoints_kept_through_orbax_preservation_policy(tmp_path):
  import orbax.checkpoint as ocp
  manager = checkpointing.create_manager(str(tmp_path), max_to_keep=2)
  options = manager._options  # pylint: disable=protected-access
  assert options.max_to_keep is None                    # the deprecated option is not used
  assert options.preservation_policy == ocp.checkpoint_managers.LatestN(n=2)
  manager.close()


class _FakeManager:

  def __init__(self, sync_step):
    self.sync_step, self.asked = sync_step, []

  def reached_preemption(self, step):
    self.asked.append(step)
    return step == self.sync_step


def test_several_processes_save_at_jaxs_preemption_sync_point(monkeypatch):
  # One process: its own SIGTERM flag, through a Python handler.
  before = signal.getsignal(signal.SIGTERM)
  manager = _FakeManager(sync_step=5)
  with preemption.SigtermFlag(manager) as flag:
    assert signal.getsignal(signal.SIGTERM) != before
    assert not flag.reached(5) and manager.asked == []
  # Several: every process asks JAX's sync point (through orbax) each step and stops at the
  # step it names, the same on all; SIGTERM stays with JAX's notifier (no Python handler).
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  with preemption.SigtermFlag(manager) as flag:
    assert signal.getsignal(signal.SIGTERM) == before
    assert [flag.reached(s) for s in (3, 4, 5)] == [False, False, True]
    assert flag.reached(6)                              # stays set
  assert manager.asked == [3, 4, 5]                    # not asked again once set
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: True)
  with preemption.SigtermRaises('w'):
    assert signal.getsignal(signal.SIGTERM) == before
