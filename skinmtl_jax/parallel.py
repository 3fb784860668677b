"""Devices and hosts: the device mesh, the shardings of state and batches, multi-host start-up.

Training runs on a 2-D mesh over every device of every process, with axes ('members', 'data'):

  config.sharding = 'data'     members axis of size 1: the batch is split across all devices,
                               the (stacked) state is replicated. The default.
  config.sharding = 'members'  the seed-ensemble's member axis goes on the mesh: the state is
                               split by member over gcd(num_seeds, devices) device groups, and
                               the batch across the devices of each group.

One device is the 1 x 1 mesh: the same code, nothing to set. BatchNorm statistics and the loss
are computed over the global batch (XLA inserts the reductions), so a sharded step is the
single-device step up to the order of float32 additions.

Several processes (hosts): `maybe_initialize_distributed` calls `jax.distributed.initialize()`
when SLURM launched several tasks or JAX's coordinator variables are set; each process then
loads only the rows of each global batch that its devices hold (`local_slices`), and
`jax.make_array_from_process_local_data` assembles the global array from them
(`device_input`).
"""

from __future__ import annotations

import math
import os
from typing import Any

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from skinmtl_jax.config_base import ConfigError, check_choice


def maybe_initialize_distributed() -> bool:
  """`jax.distributed.initialize()` when the environment describes several processes: SLURM
  with more than one task (JAX reads SLURM's variables), or JAX_COORDINATOR_ADDRESS (with
  JAX_NUM_PROCESSES / JAX_PROCESS_ID). Returns whether it initialised."""
  slurm = int(os.environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_JOB_ID' in os.environ
  explicit = bool(os.environ.get('JAX_COORDINATOR_ADDRESS'))
  if not (slurm or explicit):
    return False
  kwargs = {}
  if explicit and not slurm:
    kwargs = {'coordinator_address': os.environ['JAX_COORDINATOR_ADDRESS'],
              'num_processes': int(os.environ['JAX_NUM_PROCESSES']),
              'process_id': int(os.environ['JAX_PROCESS_ID'])}
  jax.distributed.initialize(**kwargs)
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices.',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def make_mesh(sharding: str, num_seeds: int, batch_size: int, devices=None) -> Mesh:
  """The ('members', 'data') mesh of `sharding` (config.sharding) for a run of `num_seeds`
  members and global batches of `batch_size`, over `devices` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  n, k = len(devices), num_seeds
  check_choice('sharding', sharding)  # a caller outside a validated config
  members = math.gcd(k, n) if sharding == 'members' else 1
  data = n // members
  if batch_size % data:
    raise ConfigError(
        f'batch_size={batch_size} must be divisible by the {data} devices the batch is '
        f'split over ({n} devices, sharding={sharding!r}, num_seeds={k}); change batch_size or '
        'use fewer devices (e.g. CUDA_VISIBLE_DEVICES).')
  return Mesh(np.array(devices).reshape(members, data), ('members', 'data'))


def state_sharding(mesh: Mesh) -> NamedSharding:
  """Every state leaf has a leading member axis: split over 'members' (size 1: replicated)."""
  return NamedSharding(mesh, P('members'))


def batch_sharding(mesh: Mesh, shared_batch: bool) -> NamedSharding:
  """Shared batches (B, ...) split over 'data'; per-member batches (K, B, ...) also by member."""
  return NamedSharding(mesh, P('data') if shared_batch else P('members', 'data'))


def shard_members(fn, mesh: Mesh, shared_batch: bool):
  """`fn(state, batch)`, vmapped over the member axis, run per member group when the mesh puts
  members on devices ('members' axis > 1): a shard_map that is manual over 'members' only, so
  each device group runs the vmapped step on its own members while XLA still splits the batch
  over 'data'. Every output leaf has the leading member axis.

  Why not let XLA partition the member axis itself: a vmapped convolution is a grouped
  convolution, and XLA's SPMD partitioner (jaxlib 0.10.2, CPU) splits its groups wrongly: a
  1x1 convolution fails to compile and the U-Net computes different (wrong) outputs.
  """
  if mesh.shape['members'] == 1:
    return fn
  return jax.shard_map(fn, mesh=mesh, in_specs=(P('members'), P() if shared_batch else
                                                P('members')),
                       out_specs=P('members'), axis_names={'members'})


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def local_slices(sharding: NamedSharding, global_shape: tuple[int, ...]) -> tuple[slice, ...]:
  """Per axis, the (contiguous) part of a global array that this process's devices hold: all
  of it on one process; a process of a multi-host run loads only these rows (and members)."""
  indices = list(sharding.addressable_devices_indices_map(global_shape).values())
  out = []
  for axis, size in enumerate(global_shape):
    parts = [index[axis] for index in indices]
    out.append(slice(min(s.start or 0 for s in parts),
                     max(size if s.stop is None else s.stop for s in parts)))
  return tuple(out)


def to_local(tree: Any) -> Any:
  """A copy of a (replicated or sharded) global pytree on this process's first device, for
  work every process does alone: evaluation, and logging. A tree on one device is returned
  as it is."""
  leaves = jax.tree.leaves(tree)
  if not leaves or all(len(x.sharding.device_set) == 1 for x in leaves
                       if isinstance(x, jax.Array)):
    return tree
  mesh = next(x.sharding.mesh for x in leaves if isinstance(x.sharding, NamedSharding))
  full = jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)
  host = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), full)
  return jax.device_put(host, jax.local_devices()[0])
