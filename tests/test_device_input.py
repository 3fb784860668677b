"""The training input on the device: resident data, prefetch, per-member orders, resumption."""

import shutil

import jax
import numpy as np
import pytest

from conftest import tiny_config
from helpers import assert_same_state
from skinmtl_jax import augment, device_input, input_pipeline, saved_run, train


def _params(workdir, step=None):
  return jax.device_get(saved_run.load_run(str(workdir), step)[2])


def _run(workdir, **overrides):
  cfg = tiny_config()
  cfg.num_train_steps, cfg.checkpoint_every_steps, cfg.log_every_steps = 6, 3, 3
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  train.train_and_evaluate(cfg, str(workdir))
  return _params(workdir)


@pytest.fixture(scope='module')
def streamed(tmp_path_factory):
  """Streamed input without prefetch threads: the reference the other modes must equal."""
  return _run(tmp_path_factory.mktemp('streamed'), **{'data.on_device': 'off',
                                                      'data.prefetch_batches': 0})


def test_on_device_data_and_prefetch_give_the_streamed_parameters(tmp_path, streamed):
  """Gathering the batch from the resident split inside the step (and prefetching its index
  batches) trains exactly as loading it on the host does."""
  assert_same_state(_run(tmp_path / 'resident', **{'data.on_device': 'on'}), streamed)


def test_prefetched_streamed_input_gives_the_same_parameters(tmp_path, streamed):
  assert_same_state(_run(tmp_path / 'prefetched', **{'data.on_device': 'off',
                                                     'data.prefetch_batches': 3}), streamed)


def test_per_member_orders_on_device_resume_bit_exactly(tmp_path):
  """K=2 members with their own data orders, resident data and prefetching: a run resumed from
  its step-3 checkpoint ends with the parameters of the uninterrupted run (the zipped members'
  iterator positions restore, and prefetching did not move them)."""
  kw = {'num_seeds': 2, 'seed_data_order': 'per_member', 'data.on_device': 'on',
        'data.prefetch_batches': 2}
  whole = _run(tmp_path / 'run', **kw)
  shutil.copytree(tmp_path / 'run', tmp_path / 'resumed')
  shutil.rmtree(tmp_path / 'resumed' / 'checkpoints' / '6')
  resumed = _run(tmp_path / 'resumed', **kw)
  assert_same_state(resumed, whole)
  # The members differ (own init and own order), and resumption did restart at step 3.
  assert not np.array_equal(jax.tree.leaves(whole.params)[0][0],
                            jax.tree.leaves(whole.params)[0][1])


def test_resident_batches_are_the_streamed_batches():
  """The index batches, gathered and transformed by `expand`, equal the streamed batches
  expanded the same way."""
  cfg = tiny_config()
  split = input_pipeline.get_split(cfg.data, 'train')
  streamed, _ = input_pipeline.train_dataset(split, cfg.data, batch_size=4, seed=1)
  indexed, _ = input_pipeline.train_dataset(split, cfg.data, batch_size=4, seed=1, resident=True)
  inputs = device_input.put_replicated(
      {'coords': augment.sampling_coords(32, 32),
       **input_pipeline.stacked_examples(split)}, None)
  expand = jax.jit(device_input.expand)
  moved = 0
  for a, b, _ in zip(streamed, indexed, range(5)):
    assert set(b) == {'index', 'transform'} and b['index'].dtype == np.int32
    ea, eb = expand(a, inputs), expand(b, inputs)
    for key in ('image', 'mask', 'label'):
      np.testing.assert_array_equal(ea[key], eb[key])
    assert ea['image'].dtype == np.float32 and 0 <= ea['image'].min() <= ea['image'].max() <= 1
    # Each example went through its own transform, image and mask alike.
    for i, tid in enumerate(a['transform']):
      image, mask = augment.apply_transform(a['image'][i], a['mask'][i], int(tid))
      np.testing.assert_allclose(ea['image'][i], image / 255.0, rtol=1e-6)
      np.testing.assert_array_equal(ea['mask'][i], mask)
      moved += int(tid != 0)
  assert moved > 2


def test_auto_placement_follows_the_memory_budget(monkeypatch):
  cfg = tiny_config().data
  monkeypatch.setattr(device_input, 'device_memory_bytes', lambda: 1_000_000)
  need = device_input.resident_bytes(100, (32, 32))       # 409,600 bytes
  assert need == 100 * (32 * 32 * 4 + 4)
  cfg.on_device_fraction = 0.5
  assert device_input.decide_on_device(cfg, 100)
  cfg.on_device_fraction = 0.25
  assert not device_input.decide_on_device(cfg, 100)
  cfg.on_device = 'on'
  assert device_input.decide_on_device(cfg, 100)
  cfg.on_device, cfg.on_device_fraction = 'off', 1.0
  assert not device_input.decide_on_device(cfg, 100)
