"""What a run may do to its workdir: one run at a time, and no rerun that would mix two configs.

`lock(workdir)` holds an exclusive `fcntl.flock` on `workdir/.lock` for the whole run. The
kernel releases it when the process ends in any way (SIGKILL included), so a killed run never
leaves a stale lock behind; a second run on the same workdir is refused by name.

`check_and_save_config(config, workdir)` compares the config of a rerun with the saved
`config.json` before anything is written. A run that has checkpoints or metrics may only change
the fields that config_base.FIELDS marks `rerun` (`CHANGEABLE`: how long to train, how often to
log and save, what to evaluate on, where the data lies); any other change would resume a state
trained under other settings, or not resume at all, so it is refused with the fields named.
`data.validation_fraction` is not changeable (it changes the training set), and a run saved
before the field existed counts as having 0 (its Field.before in config_base).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import json
import os
from typing import Any

from absl import logging
import jax
import ml_collections

from skinmtl_jax.config_base import BEFORE, CHANGEABLE, ConfigError

LOCK_NAME = '.lock'


class WorkdirBusy(ConfigError):
  """Another process holds the workdir's lock."""


def _lock_file(path: str, *, blocking: bool, what: str):
  """Opens `path` and takes an exclusive flock on it; returns the open file."""
  f = open(path, 'a+', encoding='utf-8')  # pylint: disable=consider-using-with
  try:
    fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
  except OSError as e:
    f.seek(0)
    holder = f.read().strip()
    f.close()
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      raise WorkdirBusy(f'{what} is in use by another process ({holder or "unknown"}); wait '
                        'for it to finish, or give another --workdir.') from None
    raise
  f.seek(0)
  f.truncate()
  f.write(f'pid {os.getpid()} on {os.uname().nodename}\n')
  f.flush()
  return f


@contextlib.contextmanager
def lock(workdir: str, *, blocking: bool = False):
  """Holds `workdir`'s exclusive lock (process 0 only: the others of a job share its workdir).

  Raises WorkdirBusy at once if another process holds it (or waits, when `blocking`).
  """
  if jax.process_index() > 0:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  f = _lock_file(os.path.join(workdir, LOCK_NAME), blocking=blocking, what=workdir)
  try:
    yield
  finally:
    f.close()  # releases the lock; the file stays (removing it would race a waiting process)


@contextlib.contextmanager
def lock_folder(folder: str, what: str):
  """A blocking exclusive lock on `folder/.lock`, e.g. while a dataset is prepared there."""
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, LOCK_NAME)
  try:
    f = _lock_file(path, blocking=False, what=what)
  except WorkdirBusy:
    logging.info('Waiting for another process that holds %s.', path)
    f = _lock_file(path, blocking=True, what=what)
  try:
    yield
  finally:
    f.close()


def _flat(d: Any, prefix: str = '') -> dict[str, Any]:
  if not isinstance(d, dict):
    return {prefix[:-1]: d}
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f'{prefix}{k}.'))
  return out


def config_changes(saved: dict, config: ml_collections.ConfigDict) -> dict[str, tuple]:
  """{field: (saved, new)} for every field whose value differs; a field that only one side has
  (added to or removed from the code since) is not a change."""
  old = {**BEFORE, **_flat(saved)}
  new = _flat(json.loads(config.to_json_best_effort()))
  return {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k] != new[k]}


def has_started(workdir: str) -> bool:
  """Whether `workdir` holds a checkpoint or metrics of a run (not just a config.json)."""
  ckpt = os.path.join(workdir, 'checkpoints')
  steps = os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt))
  return steps or os.path.exists(os.path.join(workdir, 'metrics.json'))


def check_and_save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """`check_config`, then `save_config`."""
  check_config(config, workdir)
  save_config(config, workdir)


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes `workdir/config.json` (atomically; process 0)."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with atomic_write(os.path.join(workdir, 'config.json')) as f:
      f.write(config.to_json_best_effort(indent=1))


def check_config(config: ml_collections.ConfigDict, workdir: str) -> dict[str, tuple]:
  """Refuses a rerun whose config differs from the saved one outside CHANGEABLE; writes
  nothing. Returns the (changeable) changes {field: (saved, new)}."""
  path = os.path.join(workdir, 'config.json')
  changes = {}
  if os.path.exists(path) and has_started(workdir):
    try:
      with open(path, encoding='utf-8') as f:
        saved = json.load(f)
    except (OSError, ValueError) as e:
      raise ConfigError(f'{path} is unreadable ({e}); cannot tell whether this run may resume '
                        f'under the new config. Give another --workdir.') from e
    changes = config_changes(saved, config)
    refused = {k: v for k, v in changes.items() if k not in CHANGEABLE}
    if refused:
      shown = '; '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in refused.items())
      raise ConfigError(
          f'{workdir} holds a run with another config ({shown}). These fields cannot change '
          f'in a run that has started; give a new --workdir to train with them (the run in '
          f'{workdir} stays as it is). A rerun may change only: {", ".join(sorted(CHANGEABLE))}.')
    if changes:
      logging.info('Resuming %s with changed %s.', workdir,
                   ', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changes.items()))
  return changes


# Files of an earlier run in the same workdir that a run starting afresh must not inherit: a
# calibration and decision fitted for another model (predict would apply them), their
# validation outputs.
STALE_ON_A_FRESH_START = ('calibration.json', 'decision.json', 'per_image_validation.csv')


def clear_stale_files(workdir: str) -> None:
  """Removes STALE_ON_A_FRESH_START from `workdir` (a run starting without a checkpoint)."""
  for name in STALE_ON_A_FRESH_START:
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      os.remove(path)
      logging.info('Removed %s of an earlier run in %s (this run starts afresh).', name,
                   workdir)


# ------------------------------------------------------------ what a run trains on, by identity

TRAINING_SET = 'training_set.json'


def _show(items: list, most: int = 5) -> str:
  shown = ', '.join(str(x) for x in items[:most])
  return shown + (f' and {len(items) - most} more' if len(items) > most else '')


def training_set_difference(saved: dict, now: dict) -> str | None:
  """What differs between two records of splits.training_set_record, in words, or
  None when they are the same examples, labels, transforms and order."""
  if saved.get('sha256') == now.get('sha256'):
    return None
  parts = []
  old = collections.Counter(map(tuple, saved.get('examples', [])))
  new = collections.Counter(map(tuple, now.get('examples', [])))
  added, removed = sorted((new - old).elements()), sorted((old - new).elements())
  relabelled = sorted({i for i, _ in added} & {i for i, _ in removed})
  added = [i for i, _ in added if i not in relabelled]
  removed = [i for i, _ in removed if i not in relabelled]
  if added:
    parts.append(f'{len(added)} examples added ({_show(added)})')
  if removed:
    parts.append(f'{len(removed)} removed ({_show(removed)})')
  if relabelled:
    parts.append(f'{len(relabelled)} relabelled ({_show(relabelled)})')
  for key in ('transforms', 'validation'):
    if saved.get(key) != now.get(key):
      parts.append(f'other {key} ({saved.get(key) if key == "transforms" else "held-out IDs"}'
                   f' -> {now.get(key) if key == "transforms" else "others"})')
  if not parts:
    parts.append('the same examples in another order')
  return '; '.join(parts)


def check_training_set(workdir: str, record: dict, *, resuming: bool) -> None:
  """Refuses to resume a run on other training examples than it started with (they follow
  data.eval_sets, data.data_dir, data.manual_dir and the prepared files as well as the
  config's data fields), naming the difference; writes nothing."""
  path = os.path.join(workdir, TRAINING_SET)
  if not resuming or not os.path.exists(path):
    return
  try:
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f'{path} is unreadable ({e}): the examples this run was trained on '
                      'cannot be checked. Give another --workdir.') from e
  difference = training_set_difference(saved, record)
  if difference:
    raise ConfigError(
        f'{workdir} was trained on other examples than the data now gives: {difference}. '
        'Resuming would continue on another training set. The training set follows the data '
        'the run reads (data.data_dir, data.manual_dir, the prepared files) and the images it '
        'keeps out (data.eval_sets, the validation split): restore them, or give a new '
        f'--workdir to train on this data. {workdir} was left as it was.')


def save_training_set(workdir: str, record: dict, *, resuming: bool) -> None:
  """Writes the record of what the run trains on (process 0), once: when it starts afresh,
  or when a run saved before the record existed resumes (with a warning)."""
  path = os.path.join(workdir, TRAINING_SET)
  if jax.process_index() > 0 or (resuming and os.path.exists(path)):
    return
  if resuming:
    logging.warning('%s has no %s (saved before the training set was recorded): recording the '
                    'one this run resumes on; it cannot be checked against the start.',
                    workdir, TRAINING_SET)
  with atomic_write(path) as f:
    json.dump(record, f)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'w', **open_kwargs):
  """`open(path, mode)` for writing whose file replaces `path` only when the block ends without
  an error: it is written as path.tmp and renamed, so a crash or a kill never leaves half a
  file (the old one stays, or none). Text is UTF-8 unless `encoding` is given."""
  if 'b' not in mode:
    open_kwargs.setdefault('encoding', 'utf-8')
  tmp = path + '.tmp'
  try:
    with open(tmp, mode, **open_kwargs) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
