"""Metric writers: clu's logging writer, a JSON-lines file in the workdir, and TensorBoard.

clu 0.0.12's `clu.metric_writers` imports TensorFlow unconditionally (for its SummaryWriter),
and TensorFlow is an optional extra here. `ensure_clu_importable()` registers a stand-in for
that one submodule when TensorFlow is absent, so the rest of clu (LoggingWriter, MultiWriter,
periodic_actions) imports; the stand-in raises if anyone asks it for a TensorBoard writer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from collections.abc import Mapping
from typing import Any

import numpy as np


def have_tensorflow() -> bool:
  return importlib.util.find_spec('tensorflow') is not None


def ensure_clu_importable() -> None:
  """Makes `clu.metric_writers` importable without TensorFlow (see the module docstring)."""
  name = 'clu.metric_writers.summary_writer'
  if have_tensorflow() or name in sys.modules:
    return

  class SummaryWriter:  # pylint: disable=too-few-public-methods

    def __init__(self, *args, **kwargs):
      raise ImportError('TensorBoard summaries need TensorFlow: '
                        "pip install 'skinmtl_jax[tensorboard]'.")

  stub = types.ModuleType(name)
  stub.SummaryWriter = SummaryWriter
  sys.modules[name] = stub


ensure_clu_importable()

from clu import metric_writers  # pylint: disable=g-import-not-at-top,wrong-import-position
from clu.metric_writers import interface  # pylint: disable=wrong-import-position


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
        tmp = self._path + '.tmp'
        with open(tmp, 'w', encoding='utf-8') as f:
          f.write(''.join(l + '\n' for l in kept))
        os.replace(tmp, self._path)
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


def create_writer(workdir: str, *, just_logging: bool = False) -> metric_writers.MetricWriter:
  """Logging + `workdir/scalars.jsonl` + TensorBoard files in `workdir` when TF is installed."""
  writers = [metric_writers.LoggingWriter()]
  if not just_logging:
    writers.append(JsonlWriter(os.path.join(workdir, 'scalars.jsonl'),
                               checkpoint_dir=os.path.join(workdir, 'checkpoints')))
    if have_tensorflow():
      writers.append(metric_writers.SummaryWriter(workdir))
  return metric_writers.MultiWriter(writers)


def create_summary_writer(workdir: str) -> metric_writers.MetricWriter | None:
  """TensorBoard only (None without TensorFlow): for many scalars that would flood the log."""
  return metric_writers.SummaryWriter(workdir) if have_tensorflow() else None
