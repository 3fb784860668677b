"""The paper's enlargement transforms (§3.2), applied identically to image and mask.

Transform ids 0-15:
  0-7    rotation by k * 45 degrees, k = id;
  8-11   left-right flip, then rotation by 0/90/180/270 degrees;
  12-15  up-down flip, then rotation by 0/90/180/270 degrees.
Rotations turn the picture counter-clockwise about the centre of the fixed H x W frame; what
the rotated picture does not cover is 0 in image and mask. Images are resampled bilinearly,
masks by nearest neighbour. Exact right-angle cases land on the pixel grid, so they move
pixels without interpolation.

`ENLARGEMENT_ORDER` lists the ids in the order a class with multiplicity m takes its first m:
4 gives the four right-angle rotations (the paper's benign set), 16 gives all (melanoma).
"""

from __future__ import annotations

import functools

import numpy as np

NUM_TRANSFORMS = 16
ENLARGEMENT_ORDER = (0, 2, 4, 6, 1, 3, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15)


def transform_ids(multiplicity: int) -> tuple[int, ...]:
  """The transform ids a class enlarged `multiplicity` times gets."""
  if not 1 <= multiplicity <= NUM_TRANSFORMS:
    raise ValueError(f'Enlargement multiplicity must be in 1..{NUM_TRANSFORMS}, got {multiplicity}.')
  return ENLARGEMENT_ORDER[:multiplicity]


def _flip_and_angle(tid: int) -> tuple[str | None, int]:
  if not 0 <= tid < NUM_TRANSFORMS:
    raise ValueError(f'Transform id must be in 0..{NUM_TRANSFORMS - 1}, got {tid}.')
  if tid < 8:
    return None, 45 * tid
  return ('lr' if tid < 12 else 'ud'), 90 * ((tid - 8) % 4)


@functools.lru_cache(maxsize=64)
def _source_coords(tid: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """For each output pixel, the (row, col) it samples in the input (may fall outside)."""
  flip, angle = _flip_and_angle(tid)
  cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
  yy, xx = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64),
                       indexing='ij')
  # Inverse rotation: output (y, x) reads the input at R(-angle) applied about the centre.
  # Counter-clockwise on screen, as np.rot90 turns an array.
  t = np.deg2rad(angle)
  c, s = np.cos(t), np.sin(t)
  dy, dx = yy - cy, xx - cx
  sy = cy + c * dy + s * dx
  sx = cx - s * dy + c * dx
  # Flip happens first in the forward direction, so it is undone last here.
  if flip == 'lr':
    sx = (width - 1) - sx
  elif flip == 'ud':
    sy = (height - 1) - sy
  # Snap near-integers so that right-angle rotations are exact pixel moves.
  sy = np.where(np.abs(sy - np.round(sy)) < 1e-6, np.round(sy), sy)
  sx = np.where(np.abs(sx - np.round(sx)) < 1e-6, np.round(sx), sx)
  return sy.astype(np.float32), sx.astype(np.float32)


def _bilinear(img: np.ndarray, sy: np.ndarray, sx: np.ndarray) -> np.ndarray:
  h, w = img.shape[:2]
  y0, x0 = np.floor(sy).astype(np.int64), np.floor(sx).astype(np.int64)
  wy, wx = (sy - y0)[..., None], (sx - x0)[..., None]
  out = np.zeros(sy.shape + img.shape[2:], np.float32)
  for dy, fy in ((0, 1 - wy), (1, wy)):
    for dx, fx in ((0, 1 - wx), (1, wx)):
      yi, xi = y0 + dy, x0 + dx
      ok = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
      vals = img[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)].astype(np.float32)
      out += np.where(ok[..., None], vals, 0.0) * fy * fx
  return out


def apply_transform(image: np.ndarray, mask: np.ndarray, tid: int) -> tuple[np.ndarray, np.ndarray]:
  """Applies transform `tid` to an (H, W, C) image (uint8 or float) and its (H, W) mask."""
  if tid == 0:
    return image, mask
  h, w = mask.shape
  sy, sx = _source_coords(tid, h, w)
  ny, nx, inside, on_grid = _nearest(tid, h, w)
  if on_grid:  # right-angle cases: a pure pixel move, one gather instead of four
    new_image = np.where(inside[..., None], image[ny, nx], 0).astype(image.dtype)
  else:
    new_image = _bilinear(image, sy, sx)
    if np.issubdtype(image.dtype, np.integer):
      new_image = np.clip(np.round(new_image), 0, np.iinfo(image.dtype).max)
    new_image = new_image.astype(image.dtype)
  new_mask = np.where(inside, mask[ny, nx], 0)
  return new_image, new_mask.astype(mask.dtype)


@functools.lru_cache(maxsize=64)
def _nearest(tid: int, height: int, width: int):
  sy, sx = _source_coords(tid, height, width)
  ny, nx = np.round(sy).astype(np.int64), np.round(sx).astype(np.int64)
  inside = (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
  on_grid = bool(np.all(sy == ny) and np.all(sx == nx))
  return np.clip(ny, 0, height - 1), np.clip(nx, 0, width - 1), inside, on_grid
