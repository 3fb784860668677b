"""TFDS builder for PH2 (Hospital Pedro Hispano): 200 dermoscopy images with lesion masks and
the clinical diagnosis. One split, test: the paper uses PH2 only as an unseen test set.
Common and atypical nevi are benign; melanomas are melanoma."""

from __future__ import annotations

import tensorflow_datasets as tfds

from skinmtl_jax.datasets import common, files

DIAGNOSES = ('common_nevus', 'atypical_nevus', 'melanoma')
_HEADER_ROW = 13  # the official sheet has a legend block above its header
_DIAGNOSIS_COLUMNS = ('Common Nevus', 'Atypical Nevus', 'Melanoma')


class Ph2(tfds.core.GeneratorBasedBuilder):
  """PH2 lesion segmentation and diagnosis."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [common.resolution_config(common.DEFAULT_SIZE)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Request PH2 at https://www.fc.up.pt/addi/ph2%20database.html. Extract the archive (a rar:
  use unrar or 7z) anywhere beneath one folder and pass that folder as data.manual_dir; it
  must contain PH2_dataset.xlsx and the folder 'PH2 Dataset images'.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, homepage='https://www.fc.up.pt/addi/ph2%20database.html',
        features=common.features(self.builder_config,
                                 diagnosis=tfds.features.ClassLabel(names=list(DIAGNOSES))))

  def _split_generators(self, dl_manager):
    manual_dir = str(dl_manager.manual_dir)
    cases = files.find_folder(manual_dir, 'PH2 Dataset images', recursive_files=True)
    sheet = files.find_file(manual_dir, 'PH2_dataset.xlsx')
    diagnoses = read_sheet(sheet)
    common.check_pairs(diagnoses, cases, cases, lambda i: f'{i}.bmp', lambda i: f'{i}_lesion.bmp',
                       str(sheet))
    return {'test': self._generate_examples(cases, diagnoses)}

  def _generate_examples(self, cases, diagnoses):
    size = (self.builder_config.height, self.builder_config.width)
    for name, diagnosis in diagnoses.items():
      image, mask = files.load_pair(cases, f'{name}.bmp', cases, f'{name}_lesion.bmp', size)
      yield name, {'image': image, 'mask': mask, 'label': int(diagnosis == 2),
                   'diagnosis': diagnosis, 'id': name}


def read_sheet(path) -> dict[str, int]:
  """{image name: diagnosis index} from PH2_dataset.xlsx (an 'X' in one diagnosis column)."""
  import openpyxl  # pylint: disable=import-outside-toplevel
  try:
    workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
  except Exception as e:  # openpyxl raises several types for a damaged file
    raise files.DataError(f'{path} is not a readable .xlsx file ({e}); download it again.') from e
  rows = list(workbook.worksheets[0].iter_rows(values_only=True))
  header = [str(c).strip() if c is not None else '' for c in
            (rows[_HEADER_ROW - 1] if len(rows) >= _HEADER_ROW else ())]
  if not header or header[0] != 'Image Name' or not all(c in header for c in _DIAGNOSIS_COLUMNS):
    raise files.DataError(
        f'{path}: expected the header (Image Name, ..., {", ".join(_DIAGNOSIS_COLUMNS)}) on row '
        f'{_HEADER_ROW} of the first sheet, as in the official PH2_dataset.xlsx; found {header}.')
  columns = [header.index(c) for c in _DIAGNOSIS_COLUMNS]
  out: dict[str, int] = {}
  for n, row in enumerate(rows[_HEADER_ROW:], start=_HEADER_ROW + 1):
    if not row or row[0] is None or not str(row[0]).strip():
      continue
    name = str(row[0]).strip()
    marked = [k for k, c in enumerate(columns)
              if c < len(row) and row[c] is not None and str(row[c]).strip().upper() == 'X']
    if len(marked) != 1:
      raise files.DataError(f'{path}, row {n} ({name}): expected an X in exactly one of '
                            f'{_DIAGNOSIS_COLUMNS}, found {len(marked)}.')
    if name in out:
      raise files.DataError(f'{path}, row {n}: duplicate image name {name}.')
    out[name] = marked[0]
  if not out:
    raise files.DataError(f'{path} lists no images below its header on row {_HEADER_ROW}.')
  return out
