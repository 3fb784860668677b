"""Metric writers: clu's logging writer, a JSON-lines file in the workdir, and TensorBoard.

TensorBoard event files are written by `TensorboardWriter`, a clu MetricWriter on the
`tensorboard` package's own event-file writer (what `torch.utils.tensorboard` uses): no
TensorFlow needed, so `tensorboard --logdir RUN` works on a default install.

clu 0.0.12's `clu.metric_writers` still imports TensorFlow unconditionally (for its
SummaryWriter). `ensure_clu_importable()` registers a stand-in for that one submodule when
TensorFlow is absent, so the rest of clu (LoggingWriter, MultiWriter, periodic_actions)
imports; the stand-in's SummaryWriter is our TensorboardWriter, so clu's own
`create_default_writer` writes event files too. Every use of clu in the package goes through
this module: the train loop's progress report (`ReportProgress`, in images/s) and the parameter
overview too.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
import time
import types
from collections.abc import Mapping
from typing import Any

from absl import logging
import numpy as np

from skinmtl_jax import workdir as workdir_lib


def have_tensorflow() -> bool:
  return importlib.util.find_spec('tensorflow') is not None


def ensure_clu_importable() -> None:
  """Makes `clu.metric_writers` importable without TensorFlow (see the module docstring)."""
  name = 'clu.metric_writers.summary_writer'
  if have_tensorflow() or name in sys.modules:
    return

  class SummaryWriter:  # pylint: disable=too-few-public-methods

    def __new__(cls, logdir: str):
      return TensorboardWriter(logdir)

  stub = types.ModuleType(name)
  stub.SummaryWriter = SummaryWriter
  sys.modules[name] = stub


ensure_clu_importable()

# Every use of clu goes through this module, after the stand-in above.
from clu import metric_writers  # pylint: disable=g-import-not-at-top,wrong-import-position
from clu import parameter_overview, periodic_actions  # pylint: disable=wrong-import-position
from clu.metric_writers import interface  # pylint: disable=wrong-import-position


def _flat(d: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _png(image: np.ndarray) -> tuple[bytes, int, int, int]:
  """(PNG bytes, height, width, channels) of an (H, W[, C]) image, uint8 or floats in [0, 1]."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  a = np.asarray(image)
  if a.dtype != np.uint8:
    a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format='PNG')
  return buf.getvalue(), a.shape[0], a.shape[1], 1 if a.ndim == 2 else a.shape[-1]


class TensorboardWriter(interface.MetricWriter):
  """Writes TensorBoard event files into `logdir` with the `tensorboard` package alone.

  Scalars, images (the run's figures), texts, histograms and hparams; videos and audio are
  not written (a warning says so once).
  """

  def __init__(self, logdir: str, checkpoint_dir: str | None = None):
    # Imported here: only runs that write event files need it (a few MB, no TensorFlow).
    from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=import-outside-toplevel
    from tensorboard.summary.writer import event_file_writer  # pylint: disable=import-outside-toplevel
    os.makedirs(logdir, exist_ok=True)
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    self._writer = event_file_writer.EventFileWriter(logdir, flush_secs=30)
    self._checkpoint_dir = checkpoint_dir
    self._started = checkpoint_dir is None

  def _start(self) -> None:
    """A resumed run (one with `checkpoint_dir`) first writes the restart marker that
    TensorBoard honours: a SessionLog START at the step after the checkpoint it resumed from,
    which purges that step and every later one of the earlier event files (written before the
    run stopped, and written again now), so each step is shown once. Read at the first write,
    after the run has restored."""
    self._started = True
    step = latest_checkpoint_step(self._checkpoint_dir) + 1
    self._writer.add_event(self._event_pb2.Event(
        wall_time=time.time(), step=step,
        session_log=self._event_pb2.SessionLog(status=self._event_pb2.SessionLog.START)))

  def _add(self, step: int, values: list) -> None:
    self._add_summary(step, self._summary_pb2.Summary(value=values))

  def _add_summary(self, step: int, summary) -> None:
    if not self._started:
      self._start()
    self._writer.add_event(self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                                 summary=summary))

  def write_summaries(self, step, values, metadata=None):
    logging.log_first_n(logging.WARNING, 'TensorboardWriter writes no raw summaries.', 1)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    self._add(step, [self._summary_pb2.Summary.Value(tag=k, simple_value=float(np.asarray(v)))
                     for k, v in scalars.items()])

  def write_images(self, step: int, images: Mapping[str, Any]):
    values = []
    for k, v in images.items():
      v = np.asarray(v)
      for i, image in enumerate(v if v.ndim == 4 else v[None]):
        data, h, w, c = _png(image)
        values.append(self._summary_pb2.Summary.Value(
            tag=k if v.ndim != 4 or len(v) == 1 else f'{k}/{i}',
            image=self._summary_pb2.Summary.Image(height=h, width=w, colorspace=c,
                                                  encoded_image_string=data)))
    self._add(step, values)

  def write_videos(self, step, videos):
    logging.log_first_n(logging.WARNING, 'TensorboardWriter writes no videos.', 1)

  def write_audios(self, step, audios, *, sample_rate):
    logging.log_first_n(logging.WARNING, 'TensorboardWriter writes no audio.', 1)

  def write_texts(self, step: int, texts: Mapping[str, str]):
    from tensorboard.plugins.text import summary_v2  # pylint: disable=import-outside-toplevel
    for k, v in texts.items():
      self._add_summary(step, summary_v2.text_pb(k, v))

  def write_histograms(self, step, arrays, num_buckets=None):
    from tensorboard.plugins.histogram import summary_v2  # pylint: disable=import-outside-toplevel
    for k, v in arrays.items():
      buckets = None if num_buckets is None else num_buckets.get(k)
      self._add_summary(step, summary_v2.histogram_pb(k, np.asarray(v), buckets=buckets))

  def write_hparams(self, hparams: Mapping[str, Any]):
    from tensorboard.plugins.hparams import summary_v2  # pylint: disable=import-outside-toplevel
    flat = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
            for k, v in _flat(hparams).items()}
    # Written directly (at step 0, which no restart marker purges): the run writes its hparams
    # before it restores, and the marker's step is known only after.
    self._writer.add_event(self._event_pb2.Event(wall_time=time.time(), step=0,
                                                 summary=summary_v2.hparams_pb(flat)))

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


def latest_checkpoint_step(checkpoint_dir: str) -> int:
  """The highest step folder in `checkpoint_dir` (0 if none): where a resumed run restarts."""
  if not os.path.isdir(checkpoint_dir):
    return 0
  return max((int(n) for n in os.listdir(checkpoint_dir) if n.isdigit()), default=0)


class JsonlWriter(interface.MetricWriter):
  """Appends one JSON object per write of scalars to a file: {"step": s, "name": value, ...}.

  Each row reaches the file when written (line buffered), so a killed run loses none. With
  `checkpoint_dir`, the first write drops the rows past the latest checkpoint in it: a resumed
  run redoes those steps and writes their rows again, which would otherwise appear twice. (It is
  read at the first write, after the run has restored, and set aside any damaged checkpoint.)
  """

  def __init__(self, path: str, checkpoint_dir: str | None = None):
    self._path = path
    self._checkpoint_dir = checkpoint_dir
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    self._file = None

  def _open(self):
    if self._checkpoint_dir is not None and os.path.exists(self._path):
      keep_to = latest_checkpoint_step(self._checkpoint_dir)
      with open(self._path, encoding='utf-8') as f:
        lines = f.read().splitlines()
      kept = []
      for line in lines:
        try:
          if int(json.loads(line)['step']) <= keep_to:
            kept.append(line)
        except (ValueError, KeyError, TypeError):
          pass  # a row cut off by a kill: dropped
      if len(kept) != len(lines):
        with workdir_lib.atomic_write(self._path) as f:
          f.write(''.join(l + '\n' for l in kept))
    self._file = open(self._path, 'a', encoding='utf-8', buffering=1)

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {'step': int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}}
    if self._file is None:
      self._open()
    self._file.write(json.dumps(row) + '\n')

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None):
    pass

  def write_hparams(self, hparams):
    with open(os.path.join(os.path.dirname(self._path), 'hparams.json'), 'w',
              encoding='utf-8') as f:
      json.dump({k: str(v) for k, v in hparams.items()}, f, indent=1)

  def flush(self):
    if self._file is not None:
      self._file.flush()

  def close(self):
    if self._file is not None:
      self._file.close()


class RunWriter(metric_writers.MultiWriter):
  """The writers of a run; `tensorboard` is its TensorBoard part (None in other processes than
  the first), for what goes to TensorBoard only (the gradient study's many scalars, figures)."""

  def __init__(self, writers, tensorboard: TensorboardWriter | None):
    super().__init__(writers)
    self.tensorboard = tensorboard


def create_writer(workdir: str, *, just_logging: bool = False) -> RunWriter:
  """Logging + `workdir/scalars.jsonl` + TensorBoard event files in `workdir`."""
  writers = [metric_writers.LoggingWriter()]
  tensorboard = None
  if not just_logging:
    writers.append(JsonlWriter(os.path.join(workdir, 'scalars.jsonl'),
                               checkpoint_dir=os.path.join(workdir, 'checkpoints')))
    tensorboard = TensorboardWriter(workdir, checkpoint_dir=os.path.join(workdir, 'checkpoints'))
    writers.append(tensorboard)
  return RunWriter(writers, tensorboard)


def write_figures(writer: interface.MetricWriter, step: int, paths: list[str]) -> None:
  """The PNG figures `paths` as TensorBoard images, tagged by file name ('figures/roc_test')."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  images = {}
  for path in paths:
    if os.path.exists(path):
      with Image.open(path) as im:
        images[f'figures/{os.path.splitext(os.path.basename(path))[0]}'] = np.asarray(
            im.convert('RGB'))
  if images:
    writer.write_images(step, images)


class ReportProgress(periodic_actions.ReportProgress):
  """clu's progress report in images: images/s (K members x batch x steps/s) beside steps/s,
  the share done and the ETA, in the log and as scalars."""

  def __init__(self, *, images_per_step: int, members: int, batch_size: int, **kwargs):
    super().__init__(**kwargs)
    self._images_per_step = images_per_step
    self._members, self._batch = members, batch_size

  def _apply(self, step: int, t: float):
    steps_per_sec = (step - self._previous_step) / (t - self._previous_time)
    images_per_sec = self._images_per_step * steps_per_sec
    message = (f'{images_per_sec:.1f} images/s ({self._members} member(s) x batch '
               f'{self._batch} x {steps_per_sec:.2f} steps/s)')
    if self._num_train_steps:
      eta = (self._num_train_steps - step) / steps_per_sec
      message += (f', {100 * step / self._num_train_steps:.1f}% ({step}/'
                  f'{self._num_train_steps}), ETA: {periodic_actions._format_secs(eta)}')  # pylint: disable=protected-access
    logging.info('Progress: %s', message)
    if self._writer is not None:
      self._writer.write_scalars(step, {'steps_per_sec': steps_per_sec,
                                        'images_per_sec': images_per_sec,
                                        'uptime': time.monotonic() - self._t0})


def log_parameter_overview(params) -> None:
  """clu's table of the parameters' shapes and sizes, in the log."""
  parameter_overview.log_parameter_overview(params)
