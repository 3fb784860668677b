"""A procedural dermoscopy-like dataset, bundled so the main job runs with no download.

Each example is drawn from its own seed (dataset seed, split, index), so the data source is a
random-access, deterministic sequence with nothing stored on disk. A picture is a skin-toned
background with low-frequency shading, a pigmented lesion, hairs and a dermoscope vignette.
Melanomas follow the ABCD rule's cues: more Asymmetric shapes, more irregular Borders, more
Colours (black, blue-grey, red-brown patches on the brown), and larger Diameters on average.
The cues overlap between the classes, so diagnosis is learnable but not trivial.

Examples: {'image': uint8 (H, W, 3), 'mask': uint8 (H, W) in {0, 1},
'label': int32 (0 benign, 1 melanoma), 'id': str}.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SPLITS = {'train': 0, 'test': 1}

_SKIN_TONES = np.array([[0.93, 0.80, 0.72], [0.87, 0.70, 0.60], [0.80, 0.62, 0.50],
                        [0.70, 0.52, 0.40], [0.58, 0.42, 0.32]], np.float32)
_BROWNS = np.array([[0.55, 0.36, 0.24], [0.45, 0.28, 0.18], [0.62, 0.44, 0.30],
                    [0.38, 0.24, 0.16]], np.float32)
# Melanoma-typical colours: black, blue-grey, red-brown, dark brown.
_MELANOMA_COLOURS = np.array([[0.10, 0.07, 0.07], [0.36, 0.42, 0.52], [0.62, 0.27, 0.24],
                              [0.26, 0.14, 0.10]], np.float32)


@dataclasses.dataclass(frozen=True)
class SyntheticLesions:
  """Random-access source of synthetic dermoscopy examples (usable as a grain data source).

  Attributes:
    split: 'train' or 'test' (different seeds, so the splits never share an image).
    num_examples: length of the split.
    image_size: (H, W).
    melanoma_fraction: probability that an example is a melanoma.
    seed: dataset seed.
  """

  split: str
  num_examples: int
  image_size: tuple[int, int] = (192, 256)
  melanoma_fraction: float = 0.3
  seed: int = 0

  def __post_init__(self):
    if self.split not in SPLITS:
      raise ValueError(f'synthetic split {self.split!r} is unknown; expected one of {list(SPLITS)}.')

  def __len__(self) -> int:
    return self.num_examples

  def label(self, index: int) -> int:
    """The label of example `index`, without drawing the picture."""
    return int(np.random.default_rng([self.seed, SPLITS[self.split], index, 0]).random()
               < self.melanoma_fraction)

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < len(self):
      raise IndexError(index)
    return render(self.label(index), np.random.default_rng([self.seed, SPLITS[self.split], index, 1]),
                  self.image_size, f'synthetic_{self.split}_{index:06d}')


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
  """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bilinearly."""
  gh, gw = cells + 1, int(cells * w / h) + 2
  grid = rng.uniform(-1, 1, (gh, gw)).astype(np.float32)
  ys = np.linspace(0, gh - 1.001, h)
  xs = np.linspace(0, gw - 1.001, w)
  y0, x0 = ys.astype(int), xs.astype(int)
  fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
  g00, g01 = grid[y0][:, x0], grid[y0][:, x0 + 1]
  g10, g11 = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
  return (g00 * (1 - fy) * (1 - fx) + g01 * (1 - fy) * fx + g10 * fy * (1 - fx) + g11 * fy * fx)


def render(label: int, rng: np.random.Generator, image_size: tuple[int, int], example_id: str) -> dict:
  """Draws one example of class `label` (0 benign, 1 melanoma) from `rng`."""
  h, w = image_size
  mel = bool(label)
  yy, xx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32),
                       indexing='ij')
  scale = min(h, w)

  # Skin: a tone, low-frequency shading and fine texture.
  tone = _SKIN_TONES[rng.integers(len(_SKIN_TONES))] + rng.normal(0, 0.02, 3).astype(np.float32)
  img = tone[None, None, :] * (1 + 0.06 * _smooth_noise(rng, h, w, 3)[..., None])
  img = img + rng.normal(0, 0.012, (h, w, 3)).astype(np.float32)

  # Lesion outline: r(theta) = R (1 + sum a_k cos(k theta + phi_k)). Melanomas get larger
  # amplitudes, odd (asymmetric) harmonics and high-frequency border irregularity.
  cy = h / 2 + rng.normal(0, 0.08) * h
  cx = w / 2 + rng.normal(0, 0.08) * w
  radius = scale * (rng.uniform(0.22, 0.36) if mel else rng.uniform(0.16, 0.32))
  theta = np.arctan2(yy - cy, xx - cx)
  dist = np.hypot(yy - cy, xx - cx)
  elong, ephi = rng.uniform(0.0, 0.25), rng.uniform(0, 2 * np.pi)
  r = 1 + elong * np.cos(2 * (theta - ephi))
  asym = rng.uniform(0.08, 0.22) if mel else rng.uniform(0.0, 0.1)
  r = r + asym * np.cos(theta - rng.uniform(0, 2 * np.pi))
  rough = rng.uniform(0.04, 0.12) if mel else rng.uniform(0.0, 0.05)
  for k in range(3, 10):
    r = r + rough * rng.normal(0, 1) / (k ** 0.5) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
  r = radius * np.clip(r, 0.35, None)
  inside = dist / r
  mask = (inside < 1.0).astype(np.uint8)

  # Pigment: a brown with a darker centre; a soft edge. Melanomas add patches of other colours.
  brown = _BROWNS[rng.integers(len(_BROWNS))] + rng.normal(0, 0.03, 3).astype(np.float32)
  pigment = np.broadcast_to(brown, (h, w, 3)).copy()
  pigment *= (1 - 0.25 * np.clip(1 - inside, 0, 1))[..., None]
  n_patches = rng.integers(2, 5) if mel else rng.integers(0, 2)
  for _ in range(n_patches):
    colour = (_MELANOMA_COLOURS[rng.integers(len(_MELANOMA_COLOURS))] if mel
              else _BROWNS[rng.integers(len(_BROWNS))] * 0.8)
    field = _smooth_noise(rng, h, w, 4)
    level = rng.uniform(0.2, 0.6)
    patch = np.clip((field - level) * 6, 0, 1)[..., None] * rng.uniform(0.5, 0.9)
    pigment = pigment * (1 - patch) + colour * patch
  pigment *= (1 + 0.08 * _smooth_noise(rng, h, w, 8))[..., None]
  softness = 0.04 if not mel else rng.uniform(0.02, 0.08)
  alpha = np.clip((1.0 - inside) / softness + 0.5, 0, 1)[..., None] * rng.uniform(0.75, 0.95)
  img = img * (1 - alpha) + pigment * alpha

  # Hairs: dark quadratic curves across the picture.
  for _ in range(rng.integers(0, 6)):
    p0, p1, p2 = (rng.uniform([0, 0], [h, w]) for _ in range(3))
    t = np.linspace(0, 1, 4 * (h + w))[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
    colour = rng.uniform(0.05, 0.25)
    thick = int(rng.integers(1, 3))
    for oy in range(thick):
      for ox in range(thick):
        py = np.clip(np.round(pts[:, 0]).astype(int) + oy, 0, h - 1)
        px = np.clip(np.round(pts[:, 1]).astype(int) + ox, 0, w - 1)
        img[py, px] = img[py, px] * 0.3 + colour * 0.7

  # Dermoscope vignette: darker towards the corners, sometimes a black rim.
  rr = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2))
  img = img * (1 - rng.uniform(0.05, 0.3) * rr[..., None] ** 2)
  if rng.random() < 0.4:
    img = img * (rr < rng.uniform(1.05, 1.3))[..., None]
  return {'image': np.round(np.clip(img, 0, 1) * 255).astype(np.uint8), 'mask': mask,
          'label': np.int32(label), 'id': example_id}
