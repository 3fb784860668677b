"""TFDS builder for ISIC 2017: training and validation images, Part 1 lesion masks and the
Part 3 `melanoma` label. Splits: train (2000), validation (150). The software uses its
melanomas as mtl4's extra training data (see input_pipeline.get_split)."""

from __future__ import annotations

import tensorflow_datasets as tfds

from skinmtl_jax.datasets import common


class Isic2017(common.IsicBuilder):
  """ISIC 2017 lesion segmentation with the melanoma label."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [common.resolution_config(common.DEFAULT_SIZE)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download from https://challenge.isic-archive.com/data/#2017: the training and validation
  data, their Part 1 ground truth (zip files) and Part 3 ground truth (CSV files). Put them,
  zipped or extracted, anywhere beneath one folder and pass that folder as data.manual_dir.
  """
  SPLIT_FILES = {
      'train': ('ISIC-2017_Training_Data', 'ISIC-2017_Training_Part1_GroundTruth',
                'ISIC-2017_Training_Part3_GroundTruth.csv'),
      'validation': ('ISIC-2017_Validation_Data', 'ISIC-2017_Validation_Part1_GroundTruth',
                     'ISIC-2017_Validation_Part3_GroundTruth.csv'),
  }
  MASK_SUFFIX = '_segmentation.png'
  CSV_HAS_HEADER = True  # image_id, melanoma, seborrheic_keratosis
  HOMEPAGE = 'https://challenge.isic-archive.com/landing/2017/'
