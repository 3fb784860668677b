"""A training run read back from its folder: its saved config (`check_run_dir`) and its model
and state at a checkpoint (`load_run`), for evaluate, predict and the gradient study. Training
itself resumes through skinmtl_jax/checkpointing.py, with the config it was given.
"""

from __future__ import annotations

import json
import os

import ml_collections

from skinmtl_jax import checkpointing, config_base, models, steps
from skinmtl_jax.checkpointing import CheckpointError
from skinmtl_jax.config_base import DTYPES, ConfigError


def check_run_dir(workdir: str) -> ml_collections.ConfigDict:
  """The saved config of the training run in `workdir`, on today's defaults (fields added since
  it was saved read what the run behaved as: config_base.from_saved); CheckpointError naming
  the path and what to do when `workdir` is no run's folder or has no checkpoint yet."""
  hint = 'give the --workdir of a training run (python -m skinmtl_jax.main --config=... ' \
         '--workdir=DIR)'
  if not os.path.isdir(workdir):
    raise CheckpointError(f'{workdir} is not a folder: {hint}.')
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise CheckpointError(f'{path} not found, so {workdir} is not the folder of a training '
                          f'run: {hint}.')
  try:
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f'{path} is unreadable ({e}): {hint}.') from e
  missing = [k for k in ('model', 'data') if not isinstance(saved, dict)
             or not isinstance(saved.get(k), dict)]
  if missing:
    raise CheckpointError(f'{path} is not the config of a training run (no {" or ".join(missing)} '
                          f'section): {hint}.')
  config = config_base.from_saved(saved)
  if not checkpointing.has_checkpoint(workdir):
    raise CheckpointError(
        f'{workdir} has no checkpoint yet: let its training save one (rerun its command to '
        f'resume it), or {hint}.')
  return config


def load_run(workdir: str, step: int | None = None, dtype: str | None = None):
  """(config, model, state) of the run in `workdir`, at its latest (or `step`'s) checkpoint;
  without `step`, the newest that restores when the latest is damaged (checkpointing.restore).
  `dtype` ('float32' or 'bfloat16') overrides the compute dtype the run was trained with
  (`model.dtype`; the parameters are float32 either way), as config.model.dtype too."""
  config = check_run_dir(workdir)
  if dtype:
    if dtype not in DTYPES:
      raise ConfigError(f'dtype {dtype!r}: expected one of {DTYPES}.')
    config.model.dtype = dtype
  try:
    model = models.create_model(config.model)
    keys = steps.member_keys(0, config.num_seeds)
    template = steps.create_train_state(model, steps.create_optimizer(config.optim, 1), keys,
                                        tuple(config.data.image_size))
  except (AttributeError, KeyError, TypeError, ValueError, ZeroDivisionError) as e:
    raise CheckpointError(f'{os.path.join(workdir, "config.json")} does not describe a model '
                          f'this version can build ({type(e).__name__}: {e}); was it edited? '
                          'Restore it, or give the --workdir of another run.') from e
  manager = checkpointing.create_manager(workdir, read_only=True)
  try:
    state = checkpointing.restore(manager, template, step=step)
  finally:
    manager.close()
  return config, model, state
