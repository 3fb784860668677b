"""The paper's enlargement transforms (§3.2), applied identically to image and mask, on the
device inside the jitted step.

Transform ids 0-15:
  0-7    rotation by k * 45 degrees, k = id;
  8-11   left-right flip, then rotation by 0/90/180/270 degrees;
  12-15  up-down flip, then rotation by 0/90/180/270 degrees.
Rotations turn the picture counter-clockwise about the centre of the fixed H x W frame; what
the rotated picture does not cover is 0 in image and mask. Images are resampled bilinearly,
masks by nearest neighbour. Exact right-angle cases land on the pixel grid, so they move
pixels without interpolation.

The geometry is computed once on the host (`sampling_coords`: for every id and output pixel,
the input position it reads, float32); `transform` reads those positions with gathers, so the
input pipeline only ships uint8 pictures and transform ids. Flips and right angles are exact
pixel moves; 45-degree images equal the former host implementation (numpy, float64 weights,
rounded to uint8) within half a grey level, their masks exactly (tests/test_augment.py, against
its recorded outputs).

`ENLARGEMENT_ORDER` lists the ids in the order a class with multiplicity m takes its first m:
4 gives the four right-angle rotations (the paper's benign set), 16 gives all (melanoma).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from skinmtl_jax.config_base import NUM_TRANSFORMS

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


def sampling_coords(height: int, width: int) -> np.ndarray:
  """(16, H, W, 2) float32: for transform id t and output pixel (y, x), the (row, col) of the
  input it samples (outside the frame where the rotated picture does not reach)."""
  return np.stack([np.stack(_source_coords(t, height, width), -1)
                   for t in range(NUM_TRANSFORMS)])


def transform(images, masks, tids, coords):
  """Applies transform tids[i] to images[i] and masks[i] (jnp, traceable).

  Args:
    images: (..., H, W, C) uint8 or float.
    masks: (..., H, W), any dtype.
    tids: (...,) int transform ids.
    coords: `sampling_coords(H, W)`.

  Returns:
    (images as float32 in the input's units, bilinear; masks in their dtype, nearest).
  """
  lead, (h, w, c) = images.shape[:-3], images.shape[-3:]
  flat = images.reshape(-1, h * w, c).astype(jnp.float32)
  flat_masks = masks.reshape(-1, h * w, 1)
  where = coords[tids.reshape(-1)]                       # (N, H, W, 2)
  sy, sx = where[..., 0], where[..., 1]
  y0, x0 = jnp.floor(sy), jnp.floor(sx)
  wy, wx = sy - y0, sx - x0                             # exact in float32
  y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)

  def read(values, yi, xi):
    """values[n, yi, xi, :] (0 outside the frame) of (N, H*W, C) values, (N, H, W) maps."""
    inside = ((yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)).reshape(len(values), -1, 1)
    index = (jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).reshape(len(values), -1, 1)
    return jnp.where(inside, jnp.take_along_axis(values, index, axis=1), 0)

  out = jnp.zeros(flat.shape, jnp.float32)
  for dy, fy in ((0, 1 - wy), (1, wy)):
    for dx, fx in ((0, 1 - wx), (1, wx)):
      weight = (fy * fx).reshape(len(flat), -1, 1)
      out = out + read(flat, y0 + dy, x0 + dx) * weight
  new_masks = read(flat_masks, jnp.round(sy).astype(jnp.int32), jnp.round(sx).astype(jnp.int32))
  return out.reshape(*lead, h, w, c), new_masks.reshape(*lead, h, w).astype(masks.dtype)


@functools.partial(jax.jit, static_argnums=3)
def _transform_one(image, mask, tid, size):
  return transform(image[None], mask[None], jnp.asarray(tid)[None],
                   jnp.asarray(sampling_coords(*size)))


def apply_transform(image: np.ndarray, mask: np.ndarray, tid: int) -> tuple[np.ndarray, np.ndarray]:
  """One (H, W, C) image and its (H, W) mask through `transform` (for inspection and tests;
  training transforms whole batches inside its step). Returns float32 images."""
  image_out, mask_out = _transform_one(image, mask, tid, mask.shape)
  return np.asarray(image_out[0]), np.asarray(mask_out[0])
