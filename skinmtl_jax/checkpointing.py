"""Orbax checkpoints of the train state and the input iterator, in `workdir/checkpoints`.

Each checkpoint is a composite of 'state' (the TrainState pytree) and 'data' (the grain
iterator's position), so a restarted run continues with the same next batch. Orbax writes into
a temporary directory and renames it when complete, so an interrupted save never shadows the
previous checkpoint.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp

from skinmtl_jax.steps import TrainState


def create_manager(workdir: str, *, max_to_keep: int = 3,
                   read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                         read_only=read_only)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')),
                               options=options)


def save(manager: ocp.CheckpointManager, state: TrainState, data_iter=None) -> None:
  """Saves `state` (and the iterator position, if given) at step `state.step`."""
  items = {'state': ocp.args.StandardSave(state)}
  if data_iter is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iter)
  manager.save(int(jax.device_get(state.step)), args=ocp.args.Composite(**items))


def restore(manager: ocp.CheckpointManager, template: TrainState, data_iter=None,
            step: int | None = None) -> TrainState:
  """Restores the latest (or `step`'s) checkpoint into the structure of `template`.

  The iterator, if given, is moved to its saved position in place.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'No checkpoint in {manager.directory}.')
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  items = {'state': ocp.args.StandardRestore(abstract)}
  if data_iter is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
  return manager.restore(step, args=ocp.args.Composite(**items))['state']
