"""What the TFDS builders of ISIC 2016, ISIC 2017 and PH2 share: resolution configs, features,
label parsing and the checks that run before anything is written.

Images and masks are stored resized to the config's resolution as zlib-compressed uint8 tensors
in ArrayRecord files, so reading them needs neither TensorFlow nor an image decoder.
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from skinmtl_jax.datasets import files
from skinmtl_jax.datasets.files import DataError

LABEL_NAMES = ('benign', 'melanoma')
DEFAULT_SIZE = (192, 256)


@dataclasses.dataclass(eq=False)
class ResolutionConfig(tfds.core.BuilderConfig):
  """A builder config naming the stored resolution, e.g. '192x256'."""

  height: int = DEFAULT_SIZE[0]
  width: int = DEFAULT_SIZE[1]


def resolution_config(size) -> ResolutionConfig:
  h, w = (int(s) for s in size)
  return ResolutionConfig(name=f'{h}x{w}', height=h, width=w,
                          description=f'images and masks resized to {h}x{w} (H x W)')


def features(config: ResolutionConfig, **extra) -> tfds.features.FeaturesDict:
  h, w = config.height, config.width
  return tfds.features.FeaturesDict({
      'image': tfds.features.Tensor(shape=(h, w, 3), dtype=np.uint8, encoding='zlib'),
      'mask': tfds.features.Tensor(shape=(h, w), dtype=np.uint8, encoding='zlib'),
      'label': tfds.features.ClassLabel(names=list(LABEL_NAMES)),
      'id': tfds.features.Text(),
      **extra,
  })


_LABEL_WORDS = {'benign': 0, 'malignant': 1, 'melanoma': 1, '0': 0, '1': 1, '0.0': 0, '1.0': 1}


def parse_label(value: str, where: str) -> int:
  v = value.strip().lower()
  if v not in _LABEL_WORDS:
    raise DataError(f'{where}: unknown label {value!r}; expected benign/malignant or 0/1.')
  return _LABEL_WORDS[v]


def read_label_csv(path: pathlib.Path, *, id_column: int = 0, label_column: int = 1,
                   header: bool) -> dict[str, int]:
  """{ISIC ID: label} from a label CSV; duplicate IDs and unknown labels raise DataError."""
  labels: dict[str, int] = {}
  with open(path, newline='', encoding='utf-8-sig') as f:
    rows = list(csv.reader(f))
  if header:
    rows = rows[1:]
  for n, row in enumerate(rows, start=2 if header else 1):
    if not row or not ''.join(row).strip():
      continue
    if len(row) <= max(id_column, label_column):
      raise DataError(f'{path}, row {n}: expected at least {max(id_column, label_column) + 1} '
                      f'columns, got {row}.')
    image_id = row[id_column].strip()
    if image_id in labels:
      raise DataError(f'{path}, row {n}: duplicate ID {image_id}.')
    labels[image_id] = parse_label(row[label_column], f'{path}, row {n}')
  if not labels:
    raise DataError(f'{path} has no label rows.')
  return labels


def check_pairs(ids, images, masks, image_name, mask_name, label_file: str) -> None:
  """Every labelled ID must have its image and its mask; raises naming the first that lacks one."""
  for image_id in ids:
    if not images.has(image_name(image_id)):
      raise DataError(f'{label_file} lists {image_id}, but {images.location(image_name(image_id))} '
                      'does not exist.')
    if not masks.has(mask_name(image_id)):
      raise DataError(f'The mask for {image_id} is missing: '
                      f'{masks.location(mask_name(image_id))} does not exist.')


class IsicBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """What the ISIC 2016 and 2017 builders share; subclasses name their files.

  Subclasses set SPLIT_FILES {split: (image folder, mask folder, label CSV)}, MASK_SUFFIX
  (the mask file is <ID><MASK_SUFFIX>), CSV_HAS_HEADER and HOMEPAGE.
  """

  SPLIT_FILES: dict[str, tuple[str, str, str]] = {}
  MASK_SUFFIX = ''
  CSV_HAS_HEADER = False
  HOMEPAGE = ''

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=features(self.builder_config),
                                 homepage=self.HOMEPAGE)

  def _split_generators(self, dl_manager):
    # Everything is found and checked before the first example is written.
    manual_dir = str(dl_manager.manual_dir)
    plans = {split: self._plan(manual_dir, *names) for split, names in self.SPLIT_FILES.items()}
    return {split: self._generate_examples(plan) for split, plan in plans.items()}

  def _plan(self, manual_dir, image_folder, mask_folder, csv_name):
    images = files.find_folder(manual_dir, image_folder)
    masks = files.find_folder(manual_dir, mask_folder)
    csv_path = files.find_file(manual_dir, csv_name)
    labels = read_label_csv(csv_path, header=self.CSV_HAS_HEADER)
    check_pairs(labels, images, masks, lambda i: f'{i}.jpg', lambda i: f'{i}{self.MASK_SUFFIX}',
                str(csv_path))
    return images, masks, labels

  def _generate_examples(self, plan):
    images, masks, labels = plan
    size = (self.builder_config.height, self.builder_config.width)
    for image_id, label in labels.items():
      image, mask = files.load_pair(images, f'{image_id}.jpg', masks,
                                    f'{image_id}{self.MASK_SUFFIX}', size)
      yield image_id, {'image': image, 'mask': mask, 'label': label, 'id': image_id}
