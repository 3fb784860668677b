"""Command line: `python -m skinmtl_jax.main --config=configs/NAME.py --workdir=DIR`.

Any config field can be overridden: `--config.num_train_steps=100`, `--config.model.reverse_mode=activations`.
"""

import logging as py_logging
import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from skinmtl_jax import parallel, train
from skinmtl_jax.config_base import ConfigError
from skinmtl_jax.datasets.files import DataError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, summaries and metrics.json.')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietOrbax(py_logging.Filter):

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Orbax logs every step of every save at INFO; keep its warnings, drop the chatter.
  logging.get_absl_handler().addFilter(_QuietOrbax())
  # Several processes (SLURM tasks, or JAX_COORDINATOR_ADDRESS): join them before using JAX.
  parallel.maybe_initialize_distributed()
  logging.info('JAX %s, devices: %s', jax.__version__, jax.devices())
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ConfigError, DataError) as e:
    sys.exit(f'skinmtl_jax: {e}')
  except FloatingPointError as e:
    sys.exit(f'skinmtl_jax: {e}')
  except train.Preempted as e:
    logging.warning('%s', e)
    sys.exit(train.PREEMPTED_EXIT_CODE)


if __name__ == '__main__':
  app.run(main)
