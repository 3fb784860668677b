"""Run by test_parallel.py: one of two processes (2 forced host devices each) of a multi-host
run on this machine, joined through JAX_COORDINATOR_ADDRESS and CPU collectives (gloo).

    python tests/multiprocess_check.py PROCESS_ID PORT WORKDIR
"""

import os
import sys

process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ.update(JAX_COORDINATOR_ADDRESS=f'localhost:{port}', JAX_NUM_PROCESSES='2',
                  JAX_PROCESS_ID=str(process_id))
sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import jax  # pylint: disable=wrong-import-position

jax.config.update('jax_cpu_collectives_implementation', 'gloo')

from conftest import tiny_config  # pylint: disable=wrong-import-position
from skinmtl_jax import parallel, train  # pylint: disable=wrong-import-position

if __name__ == '__main__':
  assert parallel.maybe_initialize_distributed()
  assert jax.process_count() == 2 and jax.device_count() == 4
  cfg = tiny_config()
  cfg.num_train_steps, cfg.checkpoint_every_steps = 3, 3
  train.train_and_evaluate(cfg, workdir)
