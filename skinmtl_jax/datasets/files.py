"""Finding the official downloads under a user's folder and reading their images.

Users hand over either the archives as downloaded (ISIC: zip files named like the folder they
hold) or the extracted folders, anywhere beneath one `manual_dir`. `find_folder(manual_dir,
NAME)` returns a `Folder` for either form; the builders then only ask it for files by name.
Every read error names the file and says what to do.
"""

from __future__ import annotations

import io
import os
import pathlib
import zipfile

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp')


class DataError(ValueError):
  """The user's data is missing or malformed; the message names the file."""


class Folder:
  """The files of one official folder, from a directory or from a zip holding it."""

  def __init__(self, where: str, files: dict[str, str], archive: zipfile.ZipFile | None):
    self.where = where            # printable location, for messages
    self._files = files           # file name -> path in the directory or member in the zip
    self._archive = archive

  def names(self) -> list[str]:
    return sorted(self._files)

  def has(self, name: str) -> bool:
    return name in self._files

  def location(self, name: str) -> str:
    return f'{self.where}/{name}'

  def read_bytes(self, name: str) -> bytes:
    if name not in self._files:
      raise DataError(f'{self.location(name)} is missing.')
    try:
      if self._archive is not None:
        return self._archive.read(self._files[name])
      return pathlib.Path(self._files[name]).read_bytes()
    except (OSError, zipfile.BadZipFile, KeyError) as e:
      raise DataError(f'Cannot read {self.location(name)}: {e}. Download it again.') from e


def check_manual_dir(manual_dir: str) -> pathlib.Path:
  """The user's download folder as a path; DataError if it is unset, missing or empty."""
  root = pathlib.Path(manual_dir).expanduser()
  if not str(manual_dir):
    raise DataError('data.manual_dir is not set: pass --config.data.manual_dir=DIR, the folder '
                    'that holds your downloads.')
  if not root.is_dir():
    raise DataError(f'data.manual_dir {root} is not a directory. Point it at the folder that '
                    'holds your downloads.')
  if not any(root.iterdir()):
    raise DataError(f'data.manual_dir {root} is empty. Put your downloads in it.')
  return root


def find_folder(manual_dir: str, name: str, *, recursive_files: bool = False) -> Folder:
  """Finds the official folder `name` beneath `manual_dir`, extracted or as `name`.zip.

  Args:
    manual_dir: the user's download folder.
    name: the official folder name, e.g. 'ISBI2016_ISIC_Part1_Training_Data'.
    recursive_files: index files in subfolders too (PH2 keeps one folder per case).
  Raises:
    DataError naming what was looked for, when neither form exists or holds no files.
  """
  root = check_manual_dir(manual_dir)
  for d in sorted(p for p in root.rglob(name) if p.is_dir()):
    it = d.rglob('*') if recursive_files else d.iterdir()
    files = {p.name: str(p) for p in it if p.is_file() and not p.name.startswith('.')}
    if not files:
      raise DataError(f'{d} is empty; it should hold the files of {name}.')
    return Folder(str(d), files, None)
  for z in sorted(root.rglob(f'{name}.zip')):
    try:
      archive = zipfile.ZipFile(z)
    except (zipfile.BadZipFile, OSError) as e:
      raise DataError(f'{z} is not a readable zip file ({e}); download it again.') from e
    prefix = f'{name}/'
    files = {}
    for info in archive.infolist():
      parts = info.filename.split('/')
      if info.is_dir() or '__MACOSX' in parts or parts[-1].startswith('.'):
        continue
      inside = name in parts[:-1]
      if inside and (recursive_files or parts[-2] == name):
        files[parts[-1]] = info.filename
    if not files:
      raise DataError(f'{z} does not contain the folder {prefix} with files in it; is it the '
                      f'official archive?')
    return Folder(str(z), files, archive)
  raise DataError(f'Neither a folder {name}/ nor {name}.zip was found under {root}. Download '
                  f'it and put it (zipped or extracted) anywhere beneath that folder.')


def find_file(manual_dir: str, name: str) -> pathlib.Path:
  """Finds a single file (such as a label CSV) beneath `manual_dir`."""
  root = check_manual_dir(manual_dir)
  found = sorted(p for p in root.rglob(name) if p.is_file())
  if not found:
    raise DataError(f'{name} was not found under {root}. Download it and put it anywhere '
                    'beneath that folder.')
  return found[0]


def decode_image(data: bytes, where: str, *, mode: str) -> Image.Image:
  """Decodes image bytes fully (so truncation is caught here) into PIL mode `mode`."""
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert(mode)
  except Exception as e:  # pylint: disable=broad-except
    # PIL's decoders raise many types on damaged input (OSError, ValueError, SyntaxError,
    # struct.error, EOFError, IndexError, DecompressionBombError...): all mean the same here.
    raise DataError(f'{where} is not a readable image ({type(e).__name__}: {e}); replace the '
                    'file with a good copy.') from e


def load_image(folder: Folder, name: str, size: tuple[int, int]) -> np.ndarray:
  """RGB image resized bilinearly to `size` (H, W), uint8 (H, W, 3)."""
  img = decode_image(folder.read_bytes(name), folder.location(name), mode='RGB')
  return np.asarray(img.resize((size[1], size[0]), Image.BILINEAR), np.uint8)


def load_mask(folder: Folder, name: str, size: tuple[int, int]) -> np.ndarray:
  """Binary lesion mask resized to `size` (H, W): bilinear, then thresholded at half. uint8 {0,1}.

  Accepts 8-bit, 1-bit and RGB encodings (PH2 ships both of the latter).
  """
  img = decode_image(folder.read_bytes(name), folder.location(name), mode='L')
  arr = np.asarray(img, np.float32)
  top = arr.max()
  if top <= 0:
    return np.zeros(size, np.uint8)
  small = Image.fromarray((arr / top).astype(np.float32), mode='F').resize(
      (size[1], size[0]), Image.BILINEAR)
  return (np.asarray(small) >= 0.5).astype(np.uint8)


def stem(name: str) -> str:
  return os.path.splitext(name)[0]
