"""Prepares a real dataset from the user's downloads:

    python -m skinmtl_jax.prepare --dataset=isic2016|isic2017|ph2 --manual_dir=DIR \
        [--data_dir=DIR] [--size=192x256]
"""

from absl import app, flags

from skinmtl_jax.datasets import builders
from skinmtl_jax.datasets.files import DataError

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags (defined when run as a program, not on import)."""
  flags.DEFINE_enum('dataset', None, sorted(builders.BUILDERS), 'Dataset to prepare.')
  flags.DEFINE_string('manual_dir', None, 'Folder holding the downloads (archives or extracted).')
  flags.DEFINE_string('data_dir', builders.DEFAULT_DATA_DIR, 'Where prepared datasets are stored.')
  flags.DEFINE_string('size', '192x256', 'Stored resolution, HxW.')
  flags.mark_flags_as_required(['dataset', 'manual_dir'])


def parse_size(text: str) -> tuple[int, int]:
  """'192x256' -> (192, 256); DataError naming --size otherwise."""
  parts = text.lower().split('x')
  try:
    size = tuple(int(v) for v in parts)
  except ValueError:
    size = ()
  if len(size) != 2 or min(size) < 1:
    raise DataError(f'--size={text}: expected the height and width in pixels as HxW, two '
                    'positive integers (e.g. --size=192x256).')
  return size


def main(argv):
  del argv
  try:
    size = parse_size(FLAGS.size)
    builder = builders.prepare(FLAGS.dataset, FLAGS.manual_dir, FLAGS.data_dir, size)
  except DataError as e:
    raise SystemExit(f'skinmtl_jax.prepare: {e}') from None
  for split, info in builder.info.splits.items():
    print(f'{FLAGS.dataset} {split}: {info.num_examples} examples in {builder.data_dir}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
