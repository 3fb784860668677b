"""Helpers several test modules share, each defined once: the environment of the subprocesses
the tests start, runners of the project's command lines (`python -m skinmtl_jax.<module>`),
waiting for a running training to log a step, and restoring and comparing training states.

Imported as `from helpers import ...`, the way the tests import conftest: pytest puts tests/ on
sys.path (rootdir conftest, no __init__.py), in each xdist worker as with `-n 0`. Not collected:
its name does not match test_*.py. conftest registers it for pytest's assertion rewriting, so
its asserts explain themselves as a test's do."""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np

from conftest import ROOT
from skinmtl_jax import saved_run

TINY = 'configs/tiny.py'


def cpu_env() -> dict[str, str]:
  """The environment for a subprocess that must run on the CPU.

  Returns:
    A new dict: os.environ as it is at the call, with JAX_PLATFORMS=cpu.
  """
  return {**os.environ, 'JAX_PLATFORMS': 'cpu'}


def run_module(module, *args, timeout=300, env=None) -> subprocess.CompletedProcess:
  """Runs `python -m <module> <args>` in the repository root and waits for it.

  Args:
    module: the module to run, e.g. 'skinmtl_jax.evaluate'.
    *args: its command-line arguments.
    timeout: seconds before subprocess.TimeoutExpired is raised.
    env: the subprocess's environment; None gives cpu_env().

  Returns:
    The CompletedProcess, with stdout and stderr captured as text. Its exit code is not
    checked: the caller asserts what it expects.
  """
  return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT,
                        env=cpu_env() if env is None else env, capture_output=True, text=True,
                        timeout=timeout)


def main_args(workdir, *overrides, config=TINY) -> list[str]:
  """The arguments of `python -m skinmtl_jax.main` for one run.

  Args:
    workdir: the run's --workdir.
    *overrides: further flags, after --config and --workdir ('--config.seed=1', ...).
    config: the --config file (with an optional ':size'); the tiny config by default.

  Returns:
    ['--config=<config>', '--workdir=<workdir>', *overrides].
  """
  return [f'--config={config}', f'--workdir={workdir}', *overrides]


def run_main(workdir, *overrides, config=TINY, timeout=300,
             env=None) -> subprocess.CompletedProcess:
  """Runs `python -m skinmtl_jax.main` (see main_args) to its end, on the CPU by default.

  Args:
    workdir, *overrides, config: as main_args.
    timeout, env: as run_module.

  Returns:
    The CompletedProcess (stdout and stderr as text); the exit code is not checked.
  """
  return run_module('skinmtl_jax.main', *main_args(workdir, *overrides, config=config),
                    timeout=timeout, env=env)


def start_main(workdir, *overrides, config=TINY, stderr=subprocess.PIPE,
               env=None) -> subprocess.Popen:
  """Starts `python -m skinmtl_jax.main` (see main_args) in the background, on the CPU.

  Args:
    workdir, *overrides, config: as main_args.
    stderr: where its stderr goes: a pipe (read it with communicate or proc.stderr) or an open
      file (a log a long run cannot block on by filling a pipe). Its stdout is discarded.
    env: its environment; None gives cpu_env().

  Returns:
    The running Popen (text mode); the caller waits for it, signals it or kills it.
  """
  return subprocess.Popen([sys.executable, '-m', 'skinmtl_jax.main',
                           *main_args(workdir, *overrides, config=config)],
                          cwd=ROOT, env=cpu_env() if env is None else env,
                          stdout=subprocess.DEVNULL, stderr=stderr, text=True)


def logged_step(workdir) -> int:
  """The last training step a run has logged so far.

  Args:
    workdir: the run's folder.

  Returns:
    The largest step of a 'train/loss' row of workdir/scalars.jsonl; 0 when there is none yet
    (or no file yet).
  """
  path = os.path.join(workdir, 'scalars.jsonl')
  if not os.path.exists(path):
    return 0
  with open(path, encoding='utf-8') as f:
    steps_seen = [json.loads(l)['step'] for l in f if 'train/loss' in l]
  return max(steps_seen, default=0)


def wait_for_step(proc, workdir, step, timeout=300, log=None, poll=0.05) -> None:
  """Waits until the run `proc` writes to `workdir` has logged training step `step`.

  Args:
    proc: the run's Popen (start_main).
    workdir: its folder (see logged_step).
    step: the step to wait for (logged_step(workdir) >= step).
    timeout: seconds to wait before the assertion fails.
    log: the path of the file the run's stderr goes to, if it is not a pipe; its tail is the
      message when the run ends early (else the tail of proc.stderr).
    poll: seconds between looks.

  Returns:
    None, once the step is logged. Raises AssertionError when the run ends first (with the
    tail of its stderr) or when `timeout` passes.
  """
  t = time.time()
  while logged_step(workdir) < step:
    assert proc.poll() is None, (log.read_text() if log is not None
                                 else proc.stderr.read())[-3000:]
    assert time.time() - t < timeout
    time.sleep(poll)


def final_state(workdir):
  """The latest checkpointed training state of the run in `workdir`, read back the way
  `evaluate` and `predict` read it (saved_run.load_run: the run's own saved config builds the
  template, so the test cannot restore into a different model than the run trained).

  Returns:
    The restored steps.TrainState (the checkpoint manager is closed).
  """
  return saved_run.load_run(str(workdir))[2]


def assert_same_state(a, b) -> None:
  """Asserts two pytrees (training states: step, params, batch_stats, opt_state) are equal,
  bit for bit, leaf by leaf.

  Args:
    a, b: the pytrees, of the same structure (the leaves are paired in order).

  Returns:
    None; raises AssertionError naming the first differing leaf's path in `a`.
  """
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
