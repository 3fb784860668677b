"""Preparing and loading the real datasets (the TFDS builders of this package).

`skinmtl_jax.prepare` is the command line for `prepare`; training calls `load`, which prepares
a dataset on first use when the config names a `data.manual_dir`. A preparation that fails leaves no dataset behind: TFDS writes into a
temporary folder and renames it only when every split is complete. Preparations of one dataset
take turns (a lock in its folder), and each starts by removing the `incomplete.*` folders that a
killed one left behind.
"""

from __future__ import annotations

import os
import shutil

from absl import logging
import tensorflow_datasets as tfds

from skinmtl_jax import workdir as workdir_lib
from skinmtl_jax.datasets import common, files
from skinmtl_jax.datasets.isic2016 import Isic2016
from skinmtl_jax.datasets.isic2017 import Isic2017
from skinmtl_jax.datasets.ph2 import Ph2

BUILDERS = {'isic2016': Isic2016, 'isic2017': Isic2017, 'ph2': Ph2}
DEFAULT_DATA_DIR = os.path.join('~', 'tensorflow_datasets')


def get_builder(name: str, data_dir: str, size) -> tfds.core.DatasetBuilder:
  if name not in BUILDERS:
    raise files.DataError(f'Unknown dataset {name!r}; expected one of {sorted(BUILDERS)}.')
  data_dir = os.path.expanduser(data_dir or DEFAULT_DATA_DIR)
  cls = BUILDERS[name]
  config = common.resolution_config(size)
  # TFDS takes a predefined config by name only; other resolutions as config objects.
  known = {c.name for c in cls.BUILDER_CONFIGS}
  return cls(data_dir=data_dir, config=config.name if config.name in known else config,
             file_format='array_record')


def prepare(name: str, manual_dir: str, data_dir: str, size) -> tfds.core.DatasetBuilder:
  """Builds dataset `name` at `size` from the user's downloads in `manual_dir`, if not built."""
  builder = get_builder(name, data_dir, size)
  if builder.is_prepared():
    return builder
  if not manual_dir:
    raise files.DataError(
        f'{name} at {size[0]}x{size[1]} is not prepared in {builder.data_dir}. Pass the folder '
        f'with your downloads as --config.data.manual_dir=DIR (or run python -m '
        f'skinmtl_jax.prepare). {builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}')
  files.check_manual_dir(manual_dir)
  parent = os.path.dirname(builder.data_dir)
  with workdir_lib.lock_folder(parent, f'The preparation of {name} in {parent}'):
    builder = get_builder(name, data_dir, size)
    if builder.is_prepared():  # by the process this one waited for
      return builder
    # Holding the lock, any 'incomplete.*' folder here is a killed preparation's: remove it.
    _remove_incomplete(parent)
    logging.info('Preparing %s at %dx%d from %s into %s.', name, size[0], size[1], manual_dir,
                 builder.data_dir)
    try:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=os.path.expanduser(manual_dir)))
    except BaseException:
      # TFDS keeps failed attempts in 'incomplete.*' folders; remove ours so nothing partial stays.
      _remove_incomplete(parent)
      raise
  return builder


def _remove_incomplete(folder: str) -> None:
  if os.path.isdir(folder):
    for entry in os.listdir(folder):
      if entry.startswith('incomplete.'):
        logging.info('Removing %s, left by an unfinished preparation.', entry)
        shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)


def load(name: str, split: str, data_cfg):
  """The TFDS data source of `name`'s `split`, preparing the dataset first if needed."""
  builder = prepare(name, data_cfg.manual_dir, data_cfg.data_dir, tuple(data_cfg.image_size))
  sources = builder.as_data_source()
  if split not in sources:
    raise files.DataError(f'{name} has no split {split!r}; it has {sorted(sources)}.')
  return sources[split]
