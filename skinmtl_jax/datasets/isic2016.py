"""TFDS builder for ISIC 2016 (ISBI 2016 challenge): Part 1 images and lesion masks, Part 3
benign/malignant labels. Splits: train (900 officially), test (379)."""

from __future__ import annotations

import tensorflow_datasets as tfds

from skinmtl_jax.datasets import common, files

_SPLITS = {
    'train': ('ISBI2016_ISIC_Part1_Training_Data', 'ISBI2016_ISIC_Part1_Training_GroundTruth',
              'ISBI2016_ISIC_Part3_Training_GroundTruth.csv'),
    'test': ('ISBI2016_ISIC_Part1_Test_Data', 'ISBI2016_ISIC_Part1_Test_GroundTruth',
             'ISBI2016_ISIC_Part3_Test_GroundTruth.csv'),
}


class Isic2016(tfds.core.GeneratorBasedBuilder):
  """ISIC 2016 lesion segmentation and melanoma classification."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [common.resolution_config(common.DEFAULT_SIZE)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download from https://challenge.isic-archive.com/data/#2016 (free registration):
  the Part 1 training and test data and ground truth (four zip files) and the Part 3 training
  and test ground truth (two CSV files). Put them, zipped or extracted, anywhere beneath one
  folder and pass that folder as data.manual_dir.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=common.features(self.builder_config),
                                 homepage='https://challenge.isic-archive.com/landing/2016/')

  def _split_generators(self, dl_manager):
    # Everything is found and checked before the first example is written.
    plans = {split: _plan(str(dl_manager.manual_dir), *names) for split, names in _SPLITS.items()}
    return {split: self._generate_examples(plan) for split, plan in plans.items()}

  def _generate_examples(self, plan):
    images, masks, labels = plan
    size = (self.builder_config.height, self.builder_config.width)
    for image_id, label in labels.items():
      yield image_id, {
          'image': files.load_image(images, f'{image_id}.jpg', size),
          'mask': files.load_mask(masks, f'{image_id}_Segmentation.png', size),
          'label': label, 'id': image_id}


def _plan(manual_dir, image_folder, mask_folder, csv_name):
  images = files.find_folder(manual_dir, image_folder)
  masks = files.find_folder(manual_dir, mask_folder)
  csv_path = files.find_file(manual_dir, csv_name)
  labels = common.read_label_csv(csv_path, header=False)
  common.check_pairs(labels, images, masks, lambda i: f'{i}.jpg',
                     lambda i: f'{i}_Segmentation.png', str(csv_path))
  return images, masks, labels
