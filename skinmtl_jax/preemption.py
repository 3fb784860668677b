"""Preemption: SIGTERM (what clusters send before they preempt or reach a time limit) ends a
run with exit status 75 (EX_TEMPFAIL, "try again"), so that launch/slurm.sbatch requeues it.

Outside the train loop `SigtermRaises` turns SIGTERM into `Preempted` at once (nothing is in
the making there); inside it, `SigtermFlag` lets the loop save a checkpoint at the next step
boundary first, and `SigtermDeferred` lets the loop's last save finish before it raises. With
several processes, JAX's preemption notifier keeps SIGTERM and every process saves the step
they agree on.
"""

from __future__ import annotations

import signal
import threading

from absl import logging
import jax

# Exit status of a run stopped by SIGTERM after saving its checkpoint (EX_TEMPFAIL: "try again").
PREEMPTED_EXIT_CODE = 75


class Preempted(BaseException):
  """The run received SIGTERM (and, inside the train loop, saved a checkpoint first); rerunning
  the same command resumes from the latest checkpoint.

  A BaseException, like KeyboardInterrupt: raised from a signal handler at any point of the
  set-up or evaluation, it must not be taken for an error by an `except Exception` there.
  """


def _own_sigterm() -> bool:
  """Whether a Python SIGTERM handler may be installed here: only Python's main thread can, and
  with several processes (jax.distributed initialised) JAX's preemption notifier keeps SIGTERM."""
  return (threading.current_thread() is threading.main_thread()
          and not jax.distributed.is_initialized())


class SigtermRaises:
  """Within the block (set-up and evaluation: no checkpoint is in the making there), SIGTERM
  raises Preempted at once; the train loop's SigtermFlag takes over while it runs. Not in a
  run of several processes (jax.distributed initialised): there JAX's preemption notifier
  keeps SIGTERM, and the train loop saves at the step every process agrees on."""

  def __init__(self, workdir: str):
    self._workdir = workdir
    self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    raise Preempted(f'SIGTERM received outside the train loop: stopped without saving (the '
                    f'checkpoints in {self._workdir}, if any, are intact); run the same command '
                    'again to continue.')

  def __enter__(self):
    if _own_sigterm():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class SigtermDeferred:
  """Within the block (the train loop's last checkpoint being finished), SIGTERM is recorded,
  not raised: raised inside orbax's wait for the save in flight, it would cut that save short
  (main exits at once on Preempted) and orbax would log it as a failed save. At the block's end
  it raises Preempted with `message`, unless the block is leaving on an exception of its own.
  Not in a run of several processes, as SigtermRaises."""

  def __init__(self, message: str):
    self.received = False
    self._message = message
    self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    self.received = True

  def __enter__(self):
    if _own_sigterm():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, exc_type, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    if self.received and exc_type is None:
      raise Preempted(self._message)


class SigtermFlag:
  """Within the block, SIGTERM sets `received` instead of killing the process, so the loop can
  save at the next step boundary (clusters send SIGTERM before preemption).

  With several processes, each would see its own signal at its own step and they could save
  different steps. There the flag is JAX's preemption sync point instead (orbax's
  `reached_preemption`): JAX's preemption notifier, installed by `jax.distributed.initialize`,
  catches SIGTERM on any process, and every process learns the same step to save at. No Python
  handler is installed then (it would hide the signal from JAX's).
  """

  def __init__(self, manager=None):
    self.received = False
    self._previous = None
    self._manager = manager
    self._sync = manager is not None and jax.process_count() > 1

  def _handle(self, signum, frame):
    del signum, frame
    if not self.received:
      logging.warning('SIGTERM: saving a checkpoint at the next step boundary, then exiting.')
    self.received = True

  def reached(self, step: int) -> bool:
    """Whether to save at `step` and stop. Called once per step, on every process."""
    if self._sync:
      self.received = self.received or self._manager.reached_preemption(step)
    return self.received

  def __enter__(self):
    if not self._sync and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
