"""TFDS builder for ISIC 2017: training and validation images, Part 1 lesion masks and the
Part 3 `melanoma` label. Splits: train (2000), validation (150). The software uses its
melanomas as mtl4's extra training data (see input_pipeline.extra_melanomas)."""

from __future__ import annotations

import tensorflow_datasets as tfds

from skinmtl_jax.datasets import common, files

_SPLITS = {
    'train': ('ISIC-2017_Training_Data', 'ISIC-2017_Training_Part1_GroundTruth',
              'ISIC-2017_Training_Part3_GroundTruth.csv'),
    'validation': ('ISIC-2017_Validation_Data', 'ISIC-2017_Validation_Part1_GroundTruth',
                   'ISIC-2017_Validation_Part3_GroundTruth.csv'),
}


class Isic2017(tfds.core.GeneratorBasedBuilder):
  """ISIC 2017 lesion segmentation with the melanoma label."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [common.resolution_config(common.DEFAULT_SIZE)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download from https://challenge.isic-archive.com/data/#2017: the training and validation
  data, their Part 1 ground truth (zip files) and Part 3 ground truth (CSV files). Put them,
  zipped or extracted, anywhere beneath one folder and pass that folder as data.manual_dir.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=common.features(self.builder_config),
                                 homepage='https://challenge.isic-archive.com/landing/2017/')

  def _split_generators(self, dl_manager):
    plans = {split: _plan(str(dl_manager.manual_dir), *names) for split, names in _SPLITS.items()}
    return {split: self._generate_examples(plan) for split, plan in plans.items()}

  def _generate_examples(self, plan):
    images, masks, labels = plan
    size = (self.builder_config.height, self.builder_config.width)
    for image_id, label in labels.items():
      yield image_id, {
          'image': files.load_image(images, f'{image_id}.jpg', size),
          'mask': files.load_mask(masks, f'{image_id}_segmentation.png', size),
          'label': label, 'id': image_id}


def _plan(manual_dir, image_folder, mask_folder, csv_name):
  images = files.find_folder(manual_dir, image_folder)
  masks = files.find_folder(manual_dir, mask_folder)
  csv_path = files.find_file(manual_dir, csv_name)
  labels = common.read_label_csv(csv_path, header=True)  # image_id, melanoma, seb. keratosis
  common.check_pairs(labels, images, masks, lambda i: f'{i}.jpg',
                     lambda i: f'{i}_segmentation.png', str(csv_path))
  return images, masks, labels
