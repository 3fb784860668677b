"""Devices and hosts (#7): sharded training equals single-device training; mesh and batch rows."""

import json
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, bias_before_batchnorm, tiny_config
from helpers import cpu_env
from skinmtl_jax import checkpointing, evaluate, parallel, saved_run, train, workdir
from skinmtl_jax.config_base import ConfigError


@pytest.fixture(scope='module')
def sharded(tmp_path_factory):
  """tests/sharded_check.py in a subprocess with 4 forced host devices."""
  workdir = tmp_path_factory.mktemp('sharded')
  proc = subprocess.run([sys.executable, str(ROOT / 'tests' / 'sharded_check.py'),
                         str(workdir / 'run')], cwd=ROOT, env=cpu_env(), capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1]
  return json.loads(line[len('RESULT '):]), workdir / 'run'


CASES = ['tiny K=1 data shared', 'tiny K=2 data shared', 'tiny K=2 members per_member']


@pytest.mark.parametrize('case', CASES)
def test_sharded_training_matches_single_device_training(sharded, case):
  r = {c['name']: c for c in sharded[0]['cases']}[case]
  np.testing.assert_allclose(r['loss_four'], r['loss_one'], rtol=1e-5)
  # Differences in units of one Adam step (lr), after 3 steps. Parameters: where a gradient is
  # tiny, Adam turns the round-off of a differently ordered reduction into up to a few percent
  # of a step; a wrong shard, batch or member order differs by whole steps. Conv biases that
  # feed BatchNorm have a true gradient of zero (pure round-off, rescaled by Adam to
  # step-sized moves): they cannot agree and are not compared ('bias_abs' is reported only).
  # The running statistics carry those biases, so they agree only to a few steps.
  assert r['param_rel'] < 0.05, r
  assert r['stats_abs'] < 10, r
  # The work really was split: the batch over devices, and with 'members' the state too.
  assert r['state_devices'] == 4
  if 'members' in case:
    assert r['mesh'] == {'members': 2, 'data': 2}
    assert r['state_shard_shape'][0] == 1 and r['state_shape'][0] == 2
    assert r['batch_shard_shape'][:2] == ([1, 2] if 'per_member' in case else [2, 32])
  else:
    assert r['mesh'] == {'members': 1, 'data': 4}
    assert r['state_shard_shape'] == r['state_shape']
    assert r['batch_shard_shape'][0] == 1


def test_a_run_on_four_devices_with_members_on_the_mesh_trains_and_evaluates(sharded):
  e2e, workdir = sharded[0]['e2e'], sharded[1]
  assert 0.0 <= e2e['dice'] <= 1.0
  metrics = json.loads((workdir / 'metrics.json').read_text())
  assert metrics['steps'] == 2 and metrics['num_seeds'] == 2
  assert (workdir / 'grad_study.csv').exists()


def test_mesh_shapes_and_batch_divisibility():
  cfg = tiny_config()
  devices = [jax.devices()[0]] * 1
  assert dict(parallel.make_mesh(cfg.sharding, cfg.num_seeds, cfg.batch_size,
                                 devices).shape) == {'members': 1, 'data': 1}
  cfg.sharding = 'nonsense'
  with pytest.raises(ConfigError, match='sharding'):
    parallel.make_mesh(cfg.sharding, cfg.num_seeds, cfg.batch_size, devices)


def test_local_slices_of_a_single_process_are_the_whole_batch():
  cfg = tiny_config()
  mesh = parallel.make_mesh(cfg.sharding, cfg.num_seeds, cfg.batch_size)
  assert parallel.local_slices(parallel.batch_sharding(mesh, True), (4,)) == (slice(0, 4),)
  assert parallel.local_slices(parallel.batch_sharding(mesh, False), (2, 4)) == (slice(0, 2),
                                                                                  slice(0, 4))


def test_distributed_start_only_when_the_environment_asks(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  for var in ('SLURM_NTASKS', 'SLURM_JOB_ID', 'JAX_COORDINATOR_ADDRESS'):
    monkeypatch.delenv(var, raising=False)
  assert not parallel.maybe_initialize_distributed()
  monkeypatch.setenv('SLURM_JOB_ID', '7')
  monkeypatch.setenv('SLURM_NTASKS', '1')
  assert not parallel.maybe_initialize_distributed()  # one task: nothing to join
  monkeypatch.setenv('SLURM_NTASKS', '2')
  assert parallel.maybe_initialize_distributed() and calls[-1] == {}  # JAX reads SLURM's vars
  monkeypatch.delenv('SLURM_NTASKS')
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', 'host:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  monkeypatch.setenv('JAX_PROCESS_ID', '1')
  assert parallel.maybe_initialize_distributed()
  assert calls[-1] == {'coordinator_address': 'host:1234', 'num_processes': 2, 'process_id': 1}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_each_loading_its_rows_train_like_one_process(tmp_path):
  """A 2-process run (2 devices each; each process loads half of every batch) ends where a
  1-device run ends, and only process 0 writes the artifacts."""
  multi, single = tmp_path / 'multi', tmp_path / 'single'
  port = str(_free_port())
  env = cpu_env()
  env.pop('SLURM_NTASKS', None)
  procs = [subprocess.Popen([sys.executable, str(ROOT / 'tests' / 'multiprocess_check.py'),
                             str(i), port, str(multi)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]

  cfg = tiny_config()
  cfg.num_train_steps, cfg.checkpoint_every_steps = 3, 3
  train.train_and_evaluate(cfg, str(single))
  a, b = saved_run.load_run(str(multi))[2], saved_run.load_run(str(single))[2]
  lr = cfg.optim.learning_rate
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a.params), jax.tree.leaves(b.params)):
    if bias_before_batchnorm(path):
      continue  # zero true gradient before BatchNorm: round-off only (see test above)
    np.testing.assert_allclose(x, y, rtol=1e-3, atol=0.05 * lr, err_msg=jax.tree_util.keystr(path))
  m_multi = json.loads((multi / 'metrics.json').read_text())
  m_single = json.loads((single / 'metrics.json').read_text())
  assert m_multi['steps'] == m_single['steps'] == 3
  assert abs(m_multi['test']['dice'] - m_single['test']['dice']) < 1e-3


def test_a_process_other_than_0_writes_only_its_checkpoint_shards(tmp_path, monkeypatch):
  """What process 1 of a multi-host run writes, simulated in one process: the project's
  modules are told they are process 1 (orbax is not: it still writes the checkpoint, as every
  process does its shards). No config.json, metrics, report, scalars, figures or lock."""
  import types

  class Process1(types.ModuleType):
    def __getattr__(self, name):
      return getattr(jax, name)

  fake = Process1('jax')
  fake.process_index = lambda *a, **k: 1
  for module in (train, workdir, checkpointing, evaluate):
    monkeypatch.setattr(module, 'jax', fake)
  cfg = tiny_config()
  cfg.num_train_steps = cfg.checkpoint_every_steps = 2
  train.train_and_evaluate(cfg, str(tmp_path))
  written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob('*') if p.is_file()}
  assert written == {'checkpoints'}, written
