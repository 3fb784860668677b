"""Command line: `python -m skinmtl_jax.main --config=configs/NAME.py --workdir=DIR`.

Any config field can be overridden: `--config.num_train_steps=100`, `--config.model.reverse_mode=activations`.
"""

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from skinmtl_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, summaries and metrics.json.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.info('JAX %s, devices: %s', jax.__version__, jax.devices())
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
