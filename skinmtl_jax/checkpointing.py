"""Orbax checkpoints of the train state and the input iterator, in `workdir/checkpoints`.

Each checkpoint is a composite of one item, 'state' (the stacked TrainState pytree). The
input's position is the state's step: batch k of the training order is a function of the seed
and k (input_pipeline.train_dataset), so a restarted run continues with the same next batches.
(Checkpoints written before this held the grain iterators' positions as 'data0', 'data1', ...;
they restore, and those items are not read.) Orbax writes into
a temporary directory and renames it when complete, so an interrupted save never shadows the
previous checkpoint.

A checkpoint damaged on disk afterwards (a truncated or empty file, missing metadata, weights
that are not finite) is skipped on restore: the newest one that restores is used and the log
names the ones passed over. A training run moves damaged ones aside into
`workdir/checkpoints_damaged/`, so that it can save that step again.
"""

from __future__ import annotations

import contextlib
import logging as py_logging
import os
import sys
import threading
import time

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from skinmtl_jax import steps
from skinmtl_jax.steps import TrainState


class QuietOrbax(py_logging.Filter):
  """Drops orbax's INFO lines (it logs every step of every save and restore); keeps its
  warnings."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or '/orbax/' not in record.pathname


def quiet_orbax_logging() -> None:
  """Installs QuietOrbax on absl's handler (once): for every command line of the package."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, QuietOrbax) for f in handler.filters):
    handler.addFilter(QuietOrbax())


def create_manager(workdir: str, *, max_to_keep: int = 3,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """The manager of `workdir/checkpoints`, keeping the latest `max_to_keep` checkpoints
  (orbax's `preservation_policy`; its `max_to_keep` option is deprecated)."""
  policy = None if read_only else ocp.checkpoint_managers.LatestN(n=max_to_keep)
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=not read_only,
                                         read_only=read_only)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')),
                               options=options)


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir/checkpoints` holds a step's folder (a run to resume)."""
  ckpt = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt))


def save(manager: ocp.CheckpointManager, state: TrainState) -> None:
  """Saves `state` at its step."""
  manager.save(steps.step_of(state), args=ocp.args.Composite(state=ocp.args.StandardSave(state)))


class _WithoutClosedLoopTracebacks:
  """sys.stderr, less the tracebacks that tensorstore's reader threads print after an orbax
  restore failed: orbax runs each restore on a fresh asyncio loop and closes it when a read
  fails, and every read still in flight then reports "RuntimeError: Event loop is closed"
  (one traceback each, about a hundred for a damaged checkpoint of our model). Only those
  traceback's pieces, written from other threads than the main one, are dropped."""

  _PIECES = frozenset({'Traceback (most recent call last):\n', 'self._check_closed()',
                       "raise RuntimeError('Event loop is closed')", 'RuntimeError', ': ',
                       'Event loop is closed', '    ', '\n'})

  def __init__(self, stream):
    self._stream = stream

  def write(self, text):
    if threading.current_thread() is not threading.main_thread() and (
        text in self._PIECES or 'base_events.py' in text):
      return len(text)
    return self._stream.write(text)

  def __getattr__(self, name):
    return getattr(self._stream, name)


@contextlib.contextmanager
def _quiet_failed_reads():
  """Within the block, a failed restore's in-flight reads do not print their tracebacks: those
  that tensorstore's threads write (_WithoutClosedLoopTracebacks; sys.stderr is restored when the
  block ends), and orbax's read coroutines that the closed loop left with their error
  unretrieved ("Exception ignored in" when they are collected). Those coroutines can be
  collected after the block ends (still in flight on a loaded machine, or held by the reported
  error's chain until the process exits), so the filter that drops exactly their unretrieved
  errors is installed once and stays; every other unraisable exception goes to the hook that
  was there before. The failure itself is reported once, by `restore`."""
  _ignore_unretrieved_reads()
  if isinstance(sys.stderr, _WithoutClosedLoopTracebacks):  # already inside one
    yield
    return
  stderr = sys.stderr
  sys.stderr = _WithoutClosedLoopTracebacks(stderr)
  try:
    yield
  finally:
    sys.stderr = stderr


def _ignore_unretrieved_reads() -> None:
  previous = sys.unraisablehook
  if getattr(previous, '_skinmtl_ignores_reads', False):
    return

  def hook(unraisable):
    if getattr(unraisable.object, '__qualname__', '') != '_read_array_index_and_device_put':
      previous(unraisable)

  hook._skinmtl_ignores_reads = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


class CheckpointError(ValueError):
  """No usable checkpoint: the message names the folder and what to do."""


def _all_finite(tree) -> bool:
  for x in jax.tree.leaves(tree):
    parts = [s.data for s in x.addressable_shards] if isinstance(x, jax.Array) else [x]
    for a in parts:
      a = np.asarray(a)
      if np.issubdtype(a.dtype, np.inexact) and not np.all(np.isfinite(a)):
        return False
  return True


def _restore_step(manager, template, step):
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))['state']
  if not _all_finite((state.params, state.batch_stats, state.opt_state)):
    raise CheckpointError('its weights are not all finite (NaN or infinity)')
  return state


def _set_aside(manager, steps) -> None:
  """Moves damaged step folders out of the way of a training run, which saves them anew."""
  if manager._options.read_only or jax.process_index() > 0:  # pylint: disable=protected-access
    return
  root = str(manager.directory)
  aside = os.path.join(os.path.dirname(root), 'checkpoints_damaged')
  os.makedirs(aside, exist_ok=True)
  for s in steps:
    target = os.path.join(aside, f'{s}.{time.strftime("%Y%m%d-%H%M%S")}')
    os.replace(os.path.join(root, str(s)), target)
    logging.warning('Moved the damaged checkpoint of step %d to %s.', s, target)
  manager.reload()


class Rotated(CheckpointError):
  """The checkpoint's folder was removed while it was read: a training run in the same workdir
  rotated it away (max_checkpoints_to_keep). Not damage."""


def _gone(manager, step: int) -> bool:
  return not os.path.isdir(os.path.join(str(manager.directory), str(step)))


def restore(manager: ocp.CheckpointManager, template: TrainState,
            step: int | None = None) -> TrainState:
  """Restores the latest (or `step`'s) checkpoint into the structure of `template`.

  Without `step`, a checkpoint that does not restore (damaged files, non-finite weights) is
  skipped for the next older one, with a warning; CheckpointError if none restores (or
  `step`'s does not). A checkpoint that a training run in the same workdir rotates away while
  it is read (predict, evaluate or the gradient study during training) is not damage: the
  newest one is tried again (with `step`, Rotated is raised).
  """
  with _quiet_failed_reads():
    return _restore(manager, template, step)


def _restore(manager, template, step):
  where = str(manager.directory)
  if step is not None:
    try:
      return _restore_step(manager, template, step)
    except Exception as e:  # pylint: disable=broad-except
      if _gone(manager, step):
        raise Rotated(f'The checkpoint {where}/{step} was removed while it was read (a '
                      'training run in this workdir keeps only its latest checkpoints).') from e
      raise CheckpointError(f'The checkpoint {where}/{step} cannot be restored '
                            f'({type(e).__name__}: {str(e)[:200]}).') from e
  for _ in range(10):  # each retry follows a rotation by a running training
    candidates = sorted(manager.all_steps(), reverse=True)
    if not candidates:
      raise CheckpointError(f'No checkpoint in {where}: train first (python -m skinmtl_jax.main '
                            '--workdir=...), or give the --workdir of a run that has one.')
    damaged, rotated = [], False
    for s in candidates:
      try:
        state = _restore_step(manager, template, s)
      except Exception as e:  # pylint: disable=broad-except
        if _gone(manager, s):
          logging.info('The checkpoint %s/%d was removed while it was read (a training run '
                       'rotates its checkpoints); trying the newest one again.', where, s)
          rotated = True
          break
        # Orbax, tensorstore and json raise many types on damaged files; all mean the same.
        logging.warning('The checkpoint %s/%d cannot be restored (%s: %s); trying an older '
                        'one.', where, s, type(e).__name__, str(e)[:200])
        damaged.append(s)
        continue
      if damaged:
        logging.warning('Restored the checkpoint of step %d, the newest intact one in %s '
                        '(damaged: %s).', s, where, damaged)
        _set_aside(manager, damaged)
      return state
    if not rotated:
      raise CheckpointError(f'None of the checkpoints in {where} (steps {sorted(candidates)}) '
                            'can be restored: their files are damaged. Train again in a new '
                            '--workdir.')
    manager.reload()
  raise CheckpointError(f'The checkpoints in {where} kept being replaced while they were read; '
                        'try again when the training in that folder has saved.')
