"""TFDS builder for ISIC 2016 (ISBI 2016 challenge): Part 1 images and lesion masks, Part 3
benign/malignant labels. Splits: train (900 officially), test (379)."""

from __future__ import annotations

import tensorflow_datasets as tfds

from skinmtl_jax.datasets import common


class Isic2016(common.IsicBuilder):
  """ISIC 2016 lesion segmentation and melanoma classification."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [common.resolution_config(common.DEFAULT_SIZE)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download from https://challenge.isic-archive.com/data/#2016 (free registration):
  the Part 1 training and test data and ground truth (four zip files) and the Part 3 training
  and test ground truth (two CSV files). Put them, zipped or extracted, anywhere beneath one
  folder and pass that folder as data.manual_dir.
  """
  SPLIT_FILES = {
      'train': ('ISBI2016_ISIC_Part1_Training_Data', 'ISBI2016_ISIC_Part1_Training_GroundTruth',
                'ISBI2016_ISIC_Part3_Training_GroundTruth.csv'),
      'test': ('ISBI2016_ISIC_Part1_Test_Data', 'ISBI2016_ISIC_Part1_Test_GroundTruth',
               'ISBI2016_ISIC_Part3_Test_GroundTruth.csv'),
  }
  MASK_SUFFIX = '_Segmentation.png'
  CSV_HAS_HEADER = False  # rows: ISIC_0000000,benign|malignant (train) or 0.0|1.0 (test)
  HOMEPAGE = 'https://challenge.isic-archive.com/landing/2016/'
