"""Finding the official downloads under a user's folder and reading their images.

Users hand over either the archives as downloaded (ISIC: zip files named like the folder they
hold) or the extracted folders, anywhere beneath one `manual_dir`. `find_folder(manual_dir,
NAME)` returns a `Folder` for either form; the builders then only ask it for files by name.
Symbolic links to folders are followed (a folder reached twice, as through a link loop, is
visited once). Every read error names the file and says what to do.
"""

from __future__ import annotations

import io
import os
import pathlib
import zipfile

import numpy as np
from PIL import Image, ImageOps

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


def walk(root: pathlib.Path) -> list[pathlib.Path]:
  """Every path beneath `root` (not `root` itself), sorted, following symbolic links to
  folders, which `Path.rglob` does not before Python 3.13; each real folder is entered once,
  so a link loop ends."""
  out, seen = [], set()
  for top, dirs, names in os.walk(root, followlinks=True):
    st = os.stat(top)
    if (st.st_dev, st.st_ino) in seen:
      dirs[:] = []
      continue
    seen.add((st.st_dev, st.st_ino))
    dirs.sort()
    out += [pathlib.Path(top, n) for n in dirs + names]
  return sorted(out)


def _named(root: pathlib.Path, name: str) -> list[pathlib.Path]:
  return [p for p in walk(root) if p.name == name]


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
  for d in (p for p in _named(root, name) if p.is_dir()):
    it = walk(d) if recursive_files else d.iterdir()
    files = {p.name: str(p) for p in it if p.is_file() and not p.name.startswith('.')}
    if not files:
      raise DataError(f'{d} is empty; it should hold the files of {name}.')
    return Folder(str(d), files, None)
  for z in (p for p in _named(root, f'{name}.zip') if p.is_file()):
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
  found = [p for p in _named(root, name) if p.is_file()]
  if not found:
    raise DataError(f'{name} was not found under {root}. Download it and put it anywhere '
                    'beneath that folder.')
  return found[0]


def _to_8_bits(img: Image.Image, where: str) -> Image.Image:
  """16-bit (and 32-bit integer) grayscale scaled to 8 bits. PIL's own convert() clips such
  values at 255, so a 16-bit image would come out all white."""
  if img.mode.startswith('I;16') or img.mode == 'I':
    arr = np.asarray(img).astype(np.int64)
    top = 65535 if img.mode.startswith('I;16') or arr.max(initial=0) > 255 else 255
    if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
      raise DataError(f'{where} has 32-bit pixel values ({arr.min()}..{arr.max()}); save it as '
                      'an 8- or 16-bit image.')
    return Image.fromarray(np.round(arr * (255 / top)).astype(np.uint8), mode='L')
  if img.mode == 'F':
    raise DataError(f'{where} has floating-point pixels (mode F); save it as an 8- or 16-bit '
                    'image.')
  return img


# EXIF orientation (tag 0x0112) -> the transpose that turns the stored pixels upright.
_EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                   4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                   6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                   8: Image.Transpose.ROTATE_90}


def exif_turn(img: Image.Image):
  """The transpose that `img`'s EXIF orientation asks for, or None."""
  try:
    return _EXIF_TRANSPOSE.get(int(img.getexif().get(0x0112, 1)))
  except Exception:  # pylint: disable=broad-except  (a damaged EXIF block: no turn)
    return None


def decode_image(data: bytes, where: str, *, mode: str, upright: bool = True) -> Image.Image:
  """Decodes image bytes fully (so truncation is caught here) into PIL mode `mode`, upright as
  its EXIF orientation says (as image viewers show it; `upright=False`: as stored), high bit
  depths scaled to 8 bits."""
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
    if upright:
      img = ImageOps.exif_transpose(img)
  except Image.DecompressionBombError as e:
    raise DataError(f'{where} is too large to read safely ({e}); images up to '
                    f'{Image.MAX_IMAGE_PIXELS:,} pixels are read: reduce it first.') from e
  except Exception as e:  # pylint: disable=broad-except
    # PIL's decoders raise many types on damaged input (OSError, ValueError, SyntaxError,
    # struct.error, EOFError, IndexError, DecompressionBombError...): all mean the same here.
    raise DataError(f'{where} is not a readable image ({type(e).__name__}: {e}); replace the '
                    'file with a good copy.') from e
  img = _to_8_bits(img, where)
  try:
    return img.convert(mode)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'{where}: cannot convert its {img.mode} pixels to {mode} ({e}); save it '
                    'as an 8-bit RGB or grayscale image.') from e


def _resize_image(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
  return np.asarray(img.resize((size[1], size[0]), Image.BILINEAR), np.uint8)


def load_image(folder: Folder, name: str, size: tuple[int, int]) -> np.ndarray:
  """RGB image resized bilinearly to `size` (H, W), uint8 (H, W, 3)."""
  return _resize_image(decode_image(folder.read_bytes(name), folder.location(name), mode='RGB'),
                       size)


def load_mask(folder: Folder, name: str, size: tuple[int, int]) -> np.ndarray:
  """Binary lesion mask resized to `size` (H, W): bilinear, then thresholded at half. uint8 {0,1}.

  Accepts 8-bit, 1-bit, 16-bit and RGB encodings (PH2 ships 1-bit and RGB).
  """
  return _resize_mask(decode_image(folder.read_bytes(name), folder.location(name), mode='L'),
                      size)


def load_pair(images: Folder, image_name: str, masks: Folder, mask_name: str,
              size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """(image, mask) as load_image and load_mask give them; DataError naming both files when the
  mask's size is not its image's (the official data never has this: stretching it would
  misplace the lesion silently)."""
  img = decode_image(images.read_bytes(image_name), images.location(image_name), mode='RGB',
                     upright=False)
  mask = decode_image(masks.read_bytes(mask_name), masks.location(mask_name), mode='L',
                      upright=False)
  # Turned alike: the image upright as its EXIF orientation says, and its mask (drawn on the
  # stored pixels; masks carry no orientation of their own) by the same turn.
  turn = exif_turn(Image.open(io.BytesIO(images.read_bytes(image_name))))
  if turn is not None:
    img, mask = img.transpose(turn), mask.transpose(turn)
  if mask.size != img.size:
    raise DataError(f'{masks.location(mask_name)} is {mask.width}x{mask.height} pixels, but its '
                    f'image {images.location(image_name)} is {img.width}x{img.height}; a mask must have its '
                    'image\'s size. Replace one of them.')
  return _resize_image(img, size), _resize_mask(mask, size)


def _resize_mask(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
  arr = np.asarray(img, np.float32)
  top = arr.max()
  if top <= 0:
    return np.zeros(size, np.uint8)
  small = Image.fromarray((arr / top).astype(np.float32), mode='F').resize(
      (size[1], size[0]), Image.BILINEAR)
  return (np.asarray(small) >= 0.5).astype(np.uint8)


def stem(name: str) -> str:
  return os.path.splitext(name)[0]
