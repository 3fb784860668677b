"""The per-tap weight gradient of benchmarks/weight_grad.py against jax.grad of the plain
convolution: the benchmark's speed figures (benchmarks/RESULTS.md) are of the same values."""

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import weight_grad
from skinmtl_jax import models
from skinmtl_jax.config_base import get_config

NHWC = ('NHWC', 'HWIO', 'NHWC')
TAPS = weight_grad.per_tap_conv


def _rel(a, b):
  """Largest |a - b| over the largest |a|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


def _grads(fn, x, k, strides, padding):
  # A nonlinear read-out, so the output gradient is not a constant.
  loss = lambda x, k: jnp.sum(jnp.sin(fn(x, k, strides, padding, dimension_numbers=NHWC)))
  return jax.grad(loss, (0, 1))(x, k)


@pytest.mark.parametrize('shape,kernel,strides,padding', [
    ((2, 7, 9, 1), (3, 3, 1, 3), (2, 2), 'SAME'),       # stride 2, one channel, odd sizes
    ((3, 8, 6, 5), (3, 3, 5, 4), (1, 1), 'SAME'),
    ((1, 9, 11, 3), (3, 3, 3, 2), (2, 2), 'VALID'),
    ((2, 5, 7, 2), (3, 3, 2, 1), (1, 2), ((2, 0), (1, 1))),  # uneven strides and pads
    ((2, 13, 11, 2), (7, 7, 2, 1), (1, 1), 'SAME'),      # CBAM's 7x7, one output channel
    ((2, 6, 5, 4), (1, 1, 4, 3), (1, 1), 'SAME'),        # the segmentation head's 1x1
])
def test_taps_gradient_matches_jax_grad(shape, kernel, strides, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  k = jnp.asarray(rng.standard_normal(kernel), jnp.float32)
  (dx0, dk0), (dx1, dk1) = (_grads(lax.conv_general_dilated, x, k, strides, padding),
                            _grads(TAPS, x, k, strides, padding))
  out0 = lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=NHWC)
  np.testing.assert_array_equal(TAPS(x, k, strides, padding, dimension_numbers=NHWC), out0)
  np.testing.assert_array_equal(dx1, dx0)  # XLA's own input gradient
  assert _rel(dk0, dk1) <= 1e-5


def test_taps_under_vmap_over_members():
  """Seed ensembles vmap their members on GPUs: the custom VJP must batch."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((3, 2, 9, 7, 2)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 3, 2, 4)), jnp.float32)
  per_member = [_grads(TAPS, x[i], k[i], (2, 2), 'SAME')[1] for i in range(3)]
  batched = jax.vmap(lambda x, k: _grads(TAPS, x, k, (2, 2), 'SAME')[1])(x, k)
  for i in range(3):
    assert _rel(per_member[i], batched[i]) <= 1e-5
    assert _rel(_grads(lax.conv_general_dilated, x[i], k[i], (2, 2), 'SAME')[1],
                batched[i]) <= 1e-5


def test_flax_conv_takes_it_with_the_same_parameters():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 9, 7, 3)), jnp.float32)
  plain = nn.Conv(4, (3, 3), strides=(2, 2), padding='SAME')
  ours = nn.Conv(4, (3, 3), strides=(2, 2), padding='SAME', conv_general_dilated=TAPS)
  variables = plain.init(jax.random.key(0), x)
  assert jax.tree.structure(variables) == jax.tree.structure(ours.init(jax.random.key(0), x))
  loss = lambda m: jax.grad(lambda v: jnp.sum(jnp.sin(m.apply(v, x))))(variables)
  g0, g1 = loss(plain), loss(ours)
  assert _rel(g0['params']['kernel'], g1['params']['kernel']) <= 1e-5
  # The weight gradient really is ours: one dot per kernel tap.
  jaxpr = str(jax.make_jaxpr(lambda v: jax.grad(
      lambda v: jnp.sum(ours.apply(v, x)))(v)['params']['kernel'])(variables))
  assert jaxpr.count('dot_general') == 9


def test_uncovered_convolutions_are_lax_unchanged():
  x = jnp.ones((1, 8, 8, 4))
  k = jnp.ones((3, 3, 2, 4))
  grouped = lambda fn: jax.make_jaxpr(lambda k: jax.grad(lambda k: jnp.sum(fn(
      x, k, (1, 1), 'SAME', dimension_numbers=NHWC, feature_group_count=2)))(k))(k)
  assert str(grouped(TAPS)) == str(grouped(lax.conv_general_dilated))
  nchw = ('NCHW', 'OIHW', 'NCHW')
  xc, kc = jnp.ones((1, 4, 8, 8)), jnp.ones((4, 4, 3, 3))
  plain = lambda fn: jax.make_jaxpr(lambda k: jax.grad(lambda k: jnp.sum(fn(
      xc, k, (1, 1), 'SAME', dimension_numbers=nchw)))(k))(kc)
  assert str(plain(TAPS)) == str(plain(lax.conv_general_dilated))


def test_the_benchmark_variant_changes_only_the_weight_gradients():
  """per_tap_weight_grad puts the per-tap gradient into every convolution of a model (mtl0:
  encoder, decoder, the 1x1 head) and the gradients stay XLA's up to rounding."""
  cfg = get_config().model
  cfg.features, cfg.cls_hidden = (4, 8, 8), 8
  model = models.create_model(cfg)
  x = jnp.asarray(np.random.default_rng(3).uniform(size=(2, 16, 16, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), x)

  def grads():
    def loss(params):
      out, _ = model.apply({**variables, 'params': params}, x, train=True,
                           mutable=['batch_stats'])
      return jnp.sum(jnp.sin(out['seg_logits'])) + jnp.sum(out['cls_logits'] ** 2)
    return jax.make_jaxpr(jax.grad(loss))(variables['params']), jax.grad(loss)(
        variables['params'])

  jaxpr0, g0 = grads()
  with weight_grad.per_tap_weight_grad(True):
    jaxpr1, g1 = grads()
  num_convs = sum(1 for path, leaf in jax.tree_util.tree_leaves_with_path(variables['params'])
                  if "'kernel'" in jax.tree_util.keystr(path) and leaf.ndim == 4
                  and 'upconv' not in jax.tree_util.keystr(path))
  assert str(jaxpr1).count('dot_general') - str(jaxpr0).count('dot_general') >= 9 * (
      num_convs - 1)  # 9 taps per 3x3 convolution, 1 for the 1x1 head
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
    if np.max(np.abs(a)) > 1e-3:  # conv biases before BatchNorm: rounding noise only
      assert _rel(a, b) <= 1e-4, jax.tree_util.keystr(path)
