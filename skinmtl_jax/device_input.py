"""From the input pipeline's host batches to the batches the train step sees, on the device.

    grain iterator(s)            (example, transform) pairs, shuffled per epoch; the rows this
          |                      process's devices hold, loaded (streamed) or as indices
    host batch                   one per member when members read their own orders, stacked
          |  thread prefetch     the next batches are loaded while the device computes
    global device batch          jax.make_array_from_process_local_data over the mesh
          |  thread prefetch     ... and already on the device when the step asks
    expand (in the jitted step)  gather from the resident training data (data.on_device),
                                 apply the enlargement transform (augment.transform), floats

`TrainInput` builds the whole chain for a run, starting at the batch of the step the run
(re)starts from: batch k of the order is a function of the seed and k alone (see
`input_pipeline.train_dataset`), so checkpoints need no iterator state. `BoundStep` binds the
step's device-side inputs (the transform geometry and, when resident, the training data) to a
jitted step.

data.on_device: 'auto' (the default) places the prepared training split on every device when
it takes at most `data.on_device_fraction` of one device's memory (of the host's memory on a
CPU); the pipeline then yields only indices and transform ids. 'on' forces it, 'off' streams.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

from absl import logging
import grain
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from skinmtl_jax import augment, input_pipeline, parallel, splits



def expand(batch: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
  """The step's batch from the pipeline's (traceable; inside the jitted step).

  `batch` holds 'image' (uint8 or float), 'mask', 'label', or 'index' into the resident data
  `inputs['image'/'mask'/'label']`; with 'transform', the enlargement transform of each example
  is applied with `inputs['coords']`. Leading axes (members, batch) are kept. Integer images
  become float32 in [0, 1] here; float images pass as they are.
  """
  batch = dict(batch)
  if 'index' in batch:
    index = batch.pop('index')
    for key in ('image', 'mask', 'label'):
      batch[key] = inputs[key][index]
  if 'transform' in batch:
    tids = batch.pop('transform')
    image = batch['image']
    moved, batch['mask'] = augment.transform(image, batch['mask'], tids, inputs['coords'])
    batch['image'] = moved / 255.0 if jnp.issubdtype(image.dtype, jnp.integer) else moved
  return batch


def put_replicated(tree: Any, mesh: Mesh | None) -> Any:
  """Host arrays, the same in every process, as arrays replicated on every device of `mesh`
  (on the default device without one)."""
  if mesh is None:
    return jax.device_put(tree)
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      tree)


class BoundStep:
  """A jitted step with its device-side inputs bound: `step(state, batch)` calls
  `jitted(state, batch, inputs)`; `step.lower(state, batch)` lowers it (for HLO and cost
  analysis).

  Without `inputs`, batches that carry 'transform' get the geometry of their image size, made
  once per size (as for steps built outside `train`, in tests and benchmarks).
  """

  def __init__(self, jitted: Callable, inputs: dict[str, Any] | None, mesh: Mesh | None = None):
    self.jitted, self._inputs, self._mesh, self._made = jitted, inputs, mesh, {}

  def inputs_for(self, batch) -> dict[str, Any]:
    if self._inputs is not None:
      return self._inputs
    if 'transform' not in batch:
      return {}
    size = tuple(batch['image'].shape[-3:-1])
    if size not in self._made:
      self._made[size] = put_replicated({'coords': augment.sampling_coords(*size)}, self._mesh)
    return self._made[size]

  def __call__(self, state, batch):
    return self.jitted(state, batch, self.inputs_for(batch))

  def lower(self, state, batch):
    return self.jitted.lower(state, batch, self.inputs_for(batch))


def device_memory_bytes() -> int:
  """Memory of one local device; a CPU device has the host's."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'bytes_limit' in stats:
    return int(stats['bytes_limit'])
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def resident_bytes(num_examples: int, image_size: tuple[int, int]) -> int:
  """Bytes of a training split on the device: uint8 image (3) and mask (1) per pixel, label."""
  return num_examples * (image_size[0] * image_size[1] * 4 + 4)


def decide_on_device(data_cfg: ml_collections.ConfigDict, num_examples: int) -> bool:
  """Whether the training split goes on the device (data.on_device, see the module doc)."""
  mode = data_cfg.on_device
  if mode != 'auto':
    return mode == 'on'
  need = resident_bytes(num_examples, tuple(data_cfg.image_size))
  budget = data_cfg.on_device_fraction * device_memory_bytes()
  fits = need <= budget
  logging.info('data.on_device=auto: the training split takes %.1f MB, %s %.0f%% of device '
               'memory (%.1f MB): %s.', need / 2**20, 'within' if fits else 'more than',
               100 * data_cfg.on_device_fraction, budget / 2**20,
               'resident on the device' if fits else 'streamed')
  return fits


def _stack_members(batches) -> dict[str, np.ndarray]:
  return {key: np.stack([b[key] for b in batches]) for key in batches[0]}


def _to_global(local: dict[str, np.ndarray], sharding: NamedSharding,
               lead: tuple[int, ...]) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays of leading shape `lead` on the mesh."""
  return {k: jax.make_array_from_process_local_data(sharding, v, lead + v.shape[len(lead):])
          for k, v in local.items()}


class TrainInput:
  """A run's training input: global device batches, prefetched, and the step's inputs.

  Attributes:
    inputs: the device-side inputs of the step (`expand`): transform geometry, and the
      resident training data when `resident`.
    resident: whether the training split lives on the device.
    examples_per_epoch: enlarged training examples per epoch.

  `split` is the training split and `data_cfg` config.data; the run's `batch_size` and
  `num_seeds` (members) shape each global batch, (K,) B or B when the members share one order
  (`shared_order`, config.seed_data_order == 'shared'); member i reads the order of seed
  `data_seed + i`, the first member's alone when shared.

  `start(step)` starts the batches at the one of `step` (the restored step of a resumed run;
  without it, the first); then `next(train_input)` gives one global batch per step.
  """

  def __init__(self, split: splits.Split, data_cfg: ml_collections.ConfigDict, mesh: Mesh, *,
               batch_size: int, num_seeds: int, data_seed: int, shared_order: bool):
    self._split, self._data_cfg = split, data_cfg
    self._shared = shared_order
    k, self._batch_size = num_seeds, batch_size
    self._sharding = parallel.batch_sharding(mesh, self._shared)
    self._lead = (self._batch_size,) if self._shared else (k, self._batch_size)
    # Only what this process's devices hold: its rows of each batch, and its members.
    self._local = parallel.local_slices(self._sharding, self._lead)
    members = [0] if self._shared else list(range(k))[self._local[0]]
    self._seeds = [data_seed + i for i in members]
    self.resident = decide_on_device(data_cfg, len(split.source))
    self.examples_per_epoch = len(splits.enlarged_index(
        split.labels, (data_cfg.enlarge_benign, data_cfg.enlarge_melanoma)))
    self._iterator = None

    inputs = {'coords': augment.sampling_coords(*data_cfg.image_size)}
    if self.resident:
      inputs.update(input_pipeline.stacked_examples(split))
    self.inputs = put_replicated(inputs, mesh)

  def start(self, step: int) -> None:
    """Batches from the one of `step` on (each member's order at the same position)."""
    self.close()
    pipelines = [input_pipeline.train_dataset(
        self._split, self._data_cfg, batch_size=self._batch_size, seed=seed,
        rows=self._local[-1], resident=self.resident, start=step)[0] for seed in self._seeds]
    ds = pipelines[0] if self._shared else grain.experimental.ZipIterDataset(
        pipelines).map(_stack_members)
    prefetch = self._data_cfg.prefetch_batches
    if prefetch > 0:  # as grain.experimental.device_put, with global (multi-host) arrays
      ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    ds = ds.map(functools.partial(_to_global, sharding=self._sharding, lead=self._lead))
    if prefetch > 0:
      ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    self._iterator = iter(ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    if self._iterator is None:  # not started: a new run's order, from its first batch
      self.start(0)
    return next(self._iterator)

  def close(self) -> None:
    """Stops the prefetch threads."""
    close = getattr(self._iterator, 'close', None)
    if close is not None:
      close()
    self._iterator = None
