"""TensorBoard event files without TensorFlow, and the training-curves figure."""

import json
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from conftest import ROOT
from skinmtl_jax import report, writers


def _accumulator(logdir):
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={'images': 0, 'scalars': 0})
  acc.Reload()
  return acc


def test_tensorboard_writer_round_trips_scalars_images_and_hparams(tmp_path):
  w = writers.create_writer(str(tmp_path))
  w.write_hparams({'model': {'features': (4, 8)}, 'seed': 0})
  for step in (2, 4):
    w.write_scalars(step, {'train/loss': 1.0 / step})
  w.tensorboard.write_images(4, {'figures/roc_test': np.full((20, 30, 3), 200, np.uint8)})
  w.close()
  acc = _accumulator(tmp_path)
  assert [(e.step, e.value) for e in acc.Scalars('train/loss')] == [(2, 0.5), (4, 0.25)]
  (image,) = acc.Images('figures/roc_test')
  assert (image.step, image.width, image.height) == (4, 30, 20)
  assert '_hparams_/session_start_info' in acc.Tags()['tensors']


def test_clu_and_its_summary_writer_work_without_tensorflow(tmp_path):
  # In a fresh interpreter: TensorFlow is not installed, or is kept from importing.
  code = ('import sys; sys.modules["tensorflow"] = None\n'
          'from skinmtl_jax import writers\n'
          'from clu import metric_writers, periodic_actions\n'
          f'w = metric_writers.create_default_writer({str(tmp_path)!r})\n'
          'w.write_scalars(1, {"x": 1.0}); w.close()\n'
          'assert "tensorflow" not in sys.modules or sys.modules["tensorflow"] is None\n')
  r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert [e.value for e in _accumulator(tmp_path).Scalars('x')] == [1.0]


def test_curves_figure_from_scalars_jsonl(tmp_path):
  with open(tmp_path / 'scalars.jsonl', 'w', encoding='utf-8') as f:
    for step in range(2, 21, 2):
      f.write(json.dumps({'step': step, 'train/loss': 1 / step, 'train/dice_loss': 0.5 / step,
                          'train/cls_loss': 0.4 / step, 'train/learning_rate': 3e-3 * 0.9 ** step,
                          'train/l2_grads': 2.0 / step, 'train/l2_updates': 1e-3}) + '\n')
    f.write('{"step": 22, "train/lo')  # cut off by a kill
  path = report.write_curves(str(tmp_path))
  with Image.open(path) as im:
    assert im.size[0] > 3 * im.size[1] // 2  # three panels side by side
  assert report.write_curves(str(tmp_path / 'nothing')) is None


def test_a_resumed_runs_tensorboard_shows_every_step_once(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator
  first = writers.TensorboardWriter(str(tmp_path), checkpoint_dir=str(tmp_path / 'checkpoints'))
  for step in range(1, 9):  # trained to step 8, saved at 4, then killed
    first.write_scalars(step, {'train/loss': float(step)})
  first.close()
  (tmp_path / 'checkpoints' / '4').mkdir(parents=True)
  time.sleep(1.1)  # event files are named by the second they were opened in
  resumed = writers.TensorboardWriter(str(tmp_path),
                                      checkpoint_dir=str(tmp_path / 'checkpoints'))
  for step in range(5, 11):  # resumed from 4: steps 5-8 again, then on
    resumed.write_scalars(step, {'train/loss': 100.0 + step})
  resumed.close()
  acc = event_accumulator.EventAccumulator(str(tmp_path))
  acc.Reload()
  points = [(e.step, e.value) for e in acc.Scalars('train/loss')]
  assert points == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)] + [(s, 100.0 + s)
                                                               for s in range(5, 11)]
