"""The paper's 16 enlargement transforms (on the device) and the index expansion."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skinmtl_jax import augment, splits

# Outputs of the former host implementation (numpy bilinear, commit 8fd64dc) for every id, on
# an 18x28 picture and a 17x17 one: the device transforms must reproduce them.
REFERENCE = np.load(pathlib.Path(__file__).parent / 'data' / 'augment_reference.npz')


@pytest.mark.parametrize('suffix', ['', '_sq'])
def test_device_transforms_equal_the_recorded_host_outputs(suffix):
  image, mask = REFERENCE['image' + suffix], REFERENCE['mask' + suffix]
  n = augment.NUM_TRANSFORMS
  coords = jnp.asarray(augment.sampling_coords(*mask.shape))
  # The whole batch in one call, as in the train step: every id at once.
  images, masks = jax.jit(augment.transform)(
      jnp.asarray(np.repeat(image[None], n, 0)), jnp.asarray(np.repeat(mask[None], n, 0)),
      jnp.arange(n), coords)
  images, masks = np.asarray(images), np.asarray(masks)
  assert images.dtype == np.float32 and masks.dtype == np.uint8
  for tid in range(n):
    want = REFERENCE['images' + suffix][tid].astype(np.float32)
    np.testing.assert_array_equal(masks[tid], REFERENCE['masks' + suffix][tid], err_msg=tid)
    if tid % 2 == 0 or tid >= 8:   # flips and right angles: exact pixel moves
      np.testing.assert_array_equal(images[tid], want, err_msg=str(tid))
    else:                          # 45 degrees: the host rounded to uint8
      assert np.max(np.abs(images[tid] - want)) <= 0.5 + 1e-3, tid
      assert np.mean(images[tid] != want) > 0.05   # really interpolated, not copied


def test_leading_axes_and_per_example_ids():
  """(K, B) leading axes (per-member batches), each example with its own id."""
  image, mask = REFERENCE['image'], REFERENCE['mask']
  coords = jnp.asarray(augment.sampling_coords(*mask.shape))
  tids = np.array([[3, 0, 9], [15, 6, 1]])
  images, masks = augment.transform(jnp.asarray(np.broadcast_to(image, (2, 3, *image.shape))),
                                    jnp.asarray(np.broadcast_to(mask, (2, 3, *mask.shape))),
                                    jnp.asarray(tids), coords)
  assert images.shape == (2, 3, *image.shape) and masks.shape == (2, 3, *mask.shape)
  for k in range(2):
    for b in range(3):
      np.testing.assert_array_equal(masks[k, b], REFERENCE['masks'][tids[k, b]])


def asymmetric_pattern(h=16, w=24):
  img = np.zeros((h, w, 3), np.float32)
  mask = np.zeros((h, w), np.uint8)
  img[2:7, 3:12, 0] = 1.0     # an L shape: no rotation or flip maps it onto itself
  img[2:13, 3:6, 0] = 1.0
  mask[img[..., 0] > 0] = 1
  img[..., 1] = np.linspace(0, 1, w)[None, :]   # a gradient so flips are visible off-mask
  return img, mask


@pytest.mark.parametrize('tid', range(16))
def test_image_and_mask_move_together(tid):
  img, mask = asymmetric_pattern()
  new_img, new_mask = augment.apply_transform(img, mask, tid)
  assert new_img.shape == img.shape and new_mask.shape == mask.shape
  assert set(np.unique(new_mask)) <= {0, 1}
  # The mask must mark where the lesion channel went: threshold the moved channel.
  moved = new_img[..., 0] > 0.5
  agree = np.mean(moved == new_mask.astype(bool))
  assert agree > (0.97 if tid % 2 == 0 or tid >= 8 else 0.93), agree


def test_all_transforms_are_distinct():
  img, mask = asymmetric_pattern()
  masks = [augment.apply_transform(img, mask, t)[1] for t in range(16)]
  keys = {m.tobytes() for m in masks}
  # lr-flip + 180 = ud-flip etc.: the 16 of the paper contain 4 duplicates of the dihedral
  # group's 8 right-angle elements; the 4 diagonal rotations add 4 more.
  assert len(keys) == 12


def test_right_angle_cases_are_exact():
  img, mask = asymmetric_pattern(16, 16)  # square: right-angle turns lose nothing
  out, out_mask = augment.apply_transform(img, mask, 4)  # 180 degrees
  np.testing.assert_array_equal(out, img[::-1, ::-1])
  np.testing.assert_array_equal(out_mask, mask[::-1, ::-1])
  out, _ = augment.apply_transform(img, mask, 8)  # left-right flip
  np.testing.assert_array_equal(out, img[:, ::-1])
  out, _ = augment.apply_transform(img, mask, 12)  # up-down flip
  np.testing.assert_array_equal(out, img[::-1])
  out, _ = augment.apply_transform(img, mask, 2)  # 90 degrees counter-clockwise
  np.testing.assert_array_equal(out, np.rot90(img))


def test_rotation_leaves_uncovered_corners_zero():
  img = np.ones((16, 24, 3), np.float32)
  mask = np.ones((16, 24), np.uint8)
  out, out_mask = augment.apply_transform(img, mask, 1)  # 45 degrees
  assert out[0, 0].sum() == 0 and out_mask[0, 0] == 0
  assert out[8, 12].sum() == 3 and out_mask[8, 12] == 1


def test_paper_enlargement_counts():
  labels = np.array([0] * 727 + [1] * 173)  # ISIC 2016 training, paper Table 2
  pairs = splits.enlarged_index(labels, (4, 16))
  assert len(pairs) == 727 * 4 + 173 * 16 == 5676
  benign_tids = set(pairs[pairs[:, 0] == 0][:, 1].tolist())
  assert benign_tids == {0, 2, 4, 6}               # rotations by 0/90/180/270
  assert set(pairs[pairs[:, 0] == 800][:, 1].tolist()) == set(range(16))


def test_bad_multiplicity():
  with pytest.raises(ValueError, match='multiplicity'):
    augment.transform_ids(17)
