"""Orbax checkpoints of the train state and the input iterator, in `workdir/checkpoints`.

Each checkpoint is a composite of 'state' (the stacked TrainState pytree) and 'data0',
'data1', ... (the positions of the grain iterators: one, or one per member when members
read their own order), so a restarted run continues with the same next batches. Orbax writes into
a temporary directory and renames it when complete, so an interrupted save never shadows the
previous checkpoint.
"""

from __future__ import annotations

import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from skinmtl_jax.steps import TrainState


def create_manager(workdir: str, *, max_to_keep: int = 3,
                   read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                         read_only=read_only)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')),
                               options=options)


def step_of(state: TrainState) -> int:
  """The step of a (stacked) state as an int."""
  # Members move in lockstep, so any member's step will do: this process's first shard (a
  # multi-host state split by member is not fully addressable from one process).
  step = state.step
  if isinstance(step, jax.Array):
    step = step.addressable_shards[0].data
  return int(np.asarray(step).reshape(-1)[0])


def save(manager: ocp.CheckpointManager, state: TrainState, data_iters=()) -> None:
  """Saves `state` and the positions of `data_iters` at the state's step."""
  items = {'state': ocp.args.StandardSave(state)}
  for i, it in enumerate(data_iters):
    items[f'data{i}'] = grain.checkpoint.CheckpointSave(it)
  manager.save(step_of(state), args=ocp.args.Composite(**items))


def restore(manager: ocp.CheckpointManager, template: TrainState, data_iters=(),
            step: int | None = None) -> TrainState:
  """Restores the latest (or `step`'s) checkpoint into the structure of `template`.

  The iterators, if given, are moved to their saved positions in place.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'No checkpoint in {manager.directory}.')
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  items = {'state': ocp.args.StandardRestore(abstract)}
  for i, it in enumerate(data_iters):
    items[f'data{i}'] = grain.checkpoint.CheckpointRestore(it)
  return manager.restore(step, args=ocp.args.Composite(**items))['state']
