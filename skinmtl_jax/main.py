"""Command line: `python -m skinmtl_jax.main --config=configs/NAME.py --workdir=DIR`.

Any config field can be overridden: `--config.num_train_steps=100`, `--config.model.reverse_mode=activations`.
"""

import os
import signal
import sys


def _preempted_during_start(signum, frame):
  """SIGTERM before the run's own handling is in place (imports, flags): exit 75 at once, so
  that a cluster requeues the job (preemption.SigtermRaises takes over from main())."""
  del signum, frame
  os.write(2, b'skinmtl_jax: SIGTERM received while starting: stopped before the run began '
              b'(nothing was written); run the same command again.\n')
  os._exit(75)  # pylint: disable=protected-access


if __name__ == '__main__':  # as a program only: before the slow imports below
  signal.signal(signal.SIGTERM, _preempted_during_start)

import difflib  # pylint: disable=g-import-not-at-top,wrong-import-position
import importlib.util  # pylint: disable=wrong-import-position

from absl import app, flags, logging  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
from ml_collections import config_flags

from skinmtl_jax import checkpointing, parallel, preemption, train
from skinmtl_jax.config_base import ConfigError
from skinmtl_jax.datasets.files import DataError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, summaries and metrics.json.')
flags.mark_flags_as_required(['config', 'workdir'])


def _config_fields(path: str) -> list[str]:
  """The dotted field names of the config file `path` (`FILE.py` or `FILE.py:ARG`)."""
  file, _, arg = path.partition(':')
  spec = importlib.util.spec_from_file_location('_config_for_names', file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  out = []

  def walk(d, prefix):
    for k in d.keys():
      v = d[k]
      if hasattr(v, 'keys'):
        walk(v, f'{prefix}{k}.')
      out.append(f'{prefix}{k}')
  walk(config, '')
  return out


# Fields renamed since a release: an old command line names the new field.
RENAMED_FIELDS = {'model.weight_grad': 'model.conv_impl'}


def unknown_field_message(argv: list[str]) -> str | None:
  """'--config.X: no such field; did you mean ...' for the first unknown override, or None."""
  config_path = _config_path(argv)
  if config_path is None or not os.path.exists(config_path.partition(':')[0]):
    return None
  try:
    fields = _config_fields(config_path)
  except Exception:  # pylint: disable=broad-except
    return None  # the config file itself is broken: absl's own message says more
  for a in argv:
    if a.startswith('--config.'):
      name = a[len('--config.'):].split('=', 1)[0]
      if name not in fields:
        close = difflib.get_close_matches(name, fields, n=3, cutoff=0.6)
        hint = f'; did you mean {" or ".join(close)}?' if close else '.'
        if name in RENAMED_FIELDS:
          hint = f'; it is {RENAMED_FIELDS[name]!r} now.'
        return (f'--config.{name}: {config_path} has no field {name!r}{hint} '
                f'(config fields are listed in skinmtl_jax/config_base.py)')
  return None


def _config_path(argv: list[str]) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      return a.split('=', 1)[1]
    if a == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _parse_flags(argv):
  """absl's parser, but a mistake in --config ends in one line naming it, not a traceback."""
  path = _config_path(argv)
  if path is not None and not os.path.isfile(path.partition(':')[0]):
    sys.exit(f'skinmtl_jax: --config={path}: no such file (give a config file such as '
             'configs/mtl4.py, relative to the folder you run in, or its full path).')
  try:
    return FLAGS(argv)
  except flags.Error as e:
    # ml_collections re-raises a config file's own error with its traceback as the message.
    cause = e.__context__
    last = str(cause).strip().splitlines()[-1] if cause is not None else ''
    if isinstance(cause, ConfigError):  # e.g. an unknown size: configs/mtl3.py:gpu
      sys.exit(f'skinmtl_jax: {last.split(": ", 1)[-1]}')
    if isinstance(cause, TypeError) and 'get_config()' in last:  # a size for demo or tiny
      sys.exit(f'skinmtl_jax: {last.split(": ", 1)[-1]}: only the paper configs take a size '
               'after the colon (e.g. configs/mtl3.py:cpu).')
    FLAGS.unparse_flags()
    return app.parse_flags_with_usage(argv)  # absl's own message and usage
  except (AttributeError, KeyError) as e:
    message = unknown_field_message(argv) or f'cannot parse the command line: {e}'
    sys.exit(f'skinmtl_jax: {message}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Orbax logs every step of every save at INFO; keep its warnings, drop the chatter.
  checkpointing.quiet_orbax_logging()
  # SIGTERM exits 75 (requeue) from here on: at once until train_and_evaluate takes over
  # (preemption.SigtermRaises, then the train loop's SigtermFlag).
  signal.signal(signal.SIGTERM, _preempted_during_start)
  try:
    # Several processes (SLURM tasks, or JAX_COORDINATOR_ADDRESS): join them before JAX.
    parallel.maybe_initialize_distributed()
    logging.info('JAX %s, devices: %s', jax.__version__, jax.devices())
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ConfigError, DataError, checkpointing.CheckpointError) as e:
    sys.exit(f'skinmtl_jax: {e}')
  except FloatingPointError as e:
    sys.exit(f'skinmtl_jax: {e}')
  except preemption.Preempted as e:
    # Exit 75 wherever SIGTERM lands (set-up, training, evaluation): slurm.sbatch requeues.
    # os._exit: no interpreter teardown, which could crash with XLA's or the input's threads
    # still at work (a segmentation fault instead of 75); nothing is left to write here.
    print(f'skinmtl_jax: {e}', file=sys.stderr)
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(preemption.PREEMPTED_EXIT_CODE)  # pylint: disable=protected-access


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
