"""The CPU convolution kernels (skinmtl_jax/kernels) and their routing in
skinmtl_jax/models/conv.py, against XLA's convolution and jax.grad of it."""

import os
import platform

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.conv_variants import _rel  # largest |a - b| over the largest |a|
from skinmtl_jax import kernels, models
from skinmtl_jax.config_base import ConfigError, get_config, validate_config
from skinmtl_jax.models import conv

NHWC = ('NHWC', 'HWIO', 'NHWC')



def _calls(hlo: str, target: str) -> bool:
  """Whether the lowered program calls the FFI target (names are prefixes of one another)."""
  return f'@{target}(' in hlo


needs_kernel = pytest.mark.skipif(not kernels.available(),
                                  reason=f'CPU kernels: {kernels.status()}')


def _random(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_the_kernel_is_built_where_ci_runs():
  """A failed build would silently fall back to XLA's (slow) gradient: CI must notice."""
  if os.environ.get('SKINMTL_REQUIRE_KERNELS') != '1':
    pytest.skip('SKINMTL_REQUIRE_KERNELS is not set (.ci/run sets it)')
  assert platform.system() == 'Linux'
  assert kernels.available(), kernels.status()


def _grads(fn, x, k, strides, padding):
  # A nonlinear read-out, so the output gradient is not a constant.
  loss = lambda x, k: jnp.sum(jnp.sin(fn(x, k, strides, padding)))
  return jax.grad(loss, (0, 1))(x, k)


def _plain(x, k, strides, padding):
  return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=NHWC)


def _pads(shape, kernel, strides, padding):
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(shape[1:3], kernel[:2], strides, padding)
  return tuple(tuple(p) for p in padding)


SHAPES = [  # input, kernel, strides, padding
    ((2, 7, 9, 1), (3, 3, 1, 3), (2, 2), 'SAME'),       # stride 2, one channel, odd sizes
    ((3, 8, 6, 5), (3, 3, 5, 4), (1, 1), 'SAME'),
    ((1, 9, 11, 3), (3, 3, 3, 2), (2, 2), 'VALID'),
    ((2, 5, 7, 2), (3, 3, 2, 1), (1, 2), ((2, 0), (1, 1))),  # uneven strides and pads
    ((2, 10, 9, 2), (3, 3, 2, 3), (3, 3), 'VALID'),     # stride 3, trailing rows unread
    ((2, 13, 11, 2), (7, 7, 2, 1), (1, 1), 'SAME'),      # 7x7, one output channel
    ((1, 8, 8, 3), (7, 7, 3, 2), (2, 2), ((3, 3), (3, 3))),
    ((2, 6, 5, 4), (1, 1, 4, 3), (1, 1), 'SAME'),        # 1x1
    ((2, 9, 8, 3), (3, 3, 3, 2), (1, 1), ((-1, 2), (0, -2))),  # negative pads crop
    ((2, 10, 12, 40), (3, 3, 40, 8), (1, 1), 'SAME'),    # forward XLA's, input gradient GEMM
    ((1, 30, 20, 6), (3, 3, 6, 5), (2, 2), 'SAME'),      # more than one block per image
    # Winograd's (3x3, stride 1, >= 128 output pixels): odd sizes, edge tiles, cropping pads
    ((2, 17, 19, 5), (3, 3, 5, 4), (1, 1), 'SAME'),
    ((1, 20, 18, 3), (3, 3, 3, 2), (1, 1), ((0, 1), (2, -1))),
    ((1, 18, 18, 6), (3, 3, 6, 40), (1, 1), 'VALID'),
    ((1, 70, 66, 64), (3, 3, 64, 3), (1, 1), 'SAME'),    # more than one block per image
    ((1, 12, 14, 8), (3, 3, 8, 97), (1, 1), 'SAME'),     # one block: output channels split
]


@needs_kernel
@pytest.mark.parametrize('shape,kernel,strides,padding', SHAPES)
def test_the_kernels_match_xla(shape, kernel, strides, padding):
  """Each kernel alone, whatever the routing would choose: within 1e-5 of XLA's."""
  x, k = _random(shape, 0), _random(kernel, 1)
  pads = _pads(shape, kernel, strides, padding)
  y, vjp = jax.vjp(lambda x, k: _plain(x, k, strides, pads), x, k)
  g = _random(y.shape, 2)
  dx, dk = vjp(g)
  lead = (pads[0][0], pads[1][0])
  assert _rel(y, kernels.conv2d(x, k, strides, lead, y.shape[1:3])) <= 1e-5
  assert _rel(dx, kernels.conv2d_input_grad(g, k, strides, lead, shape[1:3])) <= 1e-5
  assert _rel(dk, kernels.conv2d_weight_grad(x, g, strides, lead, kernel[:2])) <= 1e-5
  if kernel[:2] == (3, 3) and strides == (1, 1):
    assert _rel(y, kernels.winograd_conv3x3(x, k, lead, y.shape[1:3])) <= 1e-5
    assert _rel(dk, kernels.winograd_conv3x3_weight_grad(x, g, lead)) <= 1e-5


@needs_kernel
@pytest.mark.parametrize('shape,kernel,strides,padding', SHAPES)
def test_gradients_match_jax_grad(shape, kernel, strides, padding):
  """`conv._conv` (the custom VJP, routed by shape) within 1e-5 of jax.grad of the plain
  convolution, with the routed kernels really in the program."""
  x, k = _random(shape, 0), _random(kernel, 1)
  pads = _pads(shape, kernel, strides, padding)
  ours = lambda x, k, strides, padding: conv._conv(x, k, strides, pads)
  (dx0, dk0), (dx1, dk1) = (_grads(_plain, x, k, strides, padding),
                            _grads(ours, x, k, strides, padding))
  assert _rel(_plain(x, k, strides, padding), ours(x, k, strides, pads)) <= 1e-5
  assert _rel(dx0, dx1) <= 1e-5
  assert _rel(dk0, dk1) <= 1e-5
  hlo = jax.jit(lambda x, k: _grads(ours, x, k, strides, padding)).lower(x, k).as_text()
  route = conv.routes(kernel, strides, shape[1:3], _plain(x, k, strides, padding).shape[1:3])
  parts = ('forward', 'input_grad')
  # Stride 1: the input gradient is a convolution of g with the flipped kernel.
  stride1 = tuple(strides) == (1, 1)
  assert hlo.count(f'@{kernels.WINOGRAD}(') == sum(route[p] == 'winograd' for p in parts)
  assert hlo.count(f'@{kernels.CONV}(') == (
      (route['forward'] == 'gemm') + (route['input_grad'] == 'gemm' and stride1))
  assert _calls(hlo, kernels.INPUT_GRAD) == (route['input_grad'] == 'gemm' and not stride1)
  assert _calls(hlo, kernels.WEIGHT_GRAD) == (route['kernel_grad'] == 'gemm')
  assert _calls(hlo, kernels.WINOGRAD_WEIGHT_GRAD) == (route['kernel_grad'] == 'winograd')


def test_routing_by_shape():
  """Winograd's for 3x3 stride-1 convolutions but tiny ones; our GEMM kernels for strided
  ones and short windows (up to 3x3x32); XLA's otherwise."""
  big, small = (96, 128), (6, 8)
  r = lambda kernel, strides, in_hw, out_hw: tuple(
      conv.routes(kernel, strides, in_hw, out_hw).values())
  assert r((3, 3, 64, 64), (1, 1), big, big) == ('winograd', 'winograd', 'winograd')
  assert r((3, 3, 64, 64), (1, 1), small, small) == ('xla', 'xla', 'gemm')
  assert r((3, 3, 32, 32), (1, 1), small, small) == ('gemm', 'gemm', 'gemm')
  assert r((3, 3, 64, 32), (1, 1), small, small) == ('xla', 'gemm', 'gemm')
  assert r((3, 3, 64, 128), (2, 2), big, (48, 64)) == ('gemm', 'gemm', 'gemm')
  assert r((1, 1, 64, 64), (1, 1), big, big) == ('gemm', 'gemm', 'gemm')
  assert r((1, 1, 512, 512), (1, 1), big, big) == ('xla', 'xla', 'gemm')


@needs_kernel
def test_the_result_does_not_depend_on_the_thread_count(monkeypatch):
  x, w = _random((3, 40, 38, 16), 2), _random((3, 3, 16, 8), 3)   # 3 chunks, blocks
  g = _random((3, 38, 36, 8), 4)
  big = _random((4, 64, 64, 5), 5)
  w97 = _random((3, 3, 16, 97), 7)
  results = []
  for threads in (1, 2, 5):
    monkeypatch.setattr(kernels, '_threads', lambda t=threads: t)
    results.append([np.asarray(f) for f in (
        kernels.conv2d(x, w, (1, 1), (0, 0), (38, 36)),
        kernels.conv2d_input_grad(g, w, (1, 1), (0, 0), (40, 38)),
        kernels.conv2d_weight_grad(x, g, (1, 1), (0, 0), (3, 3)),
        kernels.winograd_conv3x3(x, w, (0, 0), (38, 36)),
        kernels.winograd_conv3x3(x[:1, :12, :14], w97, (1, 1), (12, 14)),  # channel groups
        # 4 chunks of 1024 tiles
        kernels.winograd_conv3x3_weight_grad(big, _random((4, 64, 64, 8), 6), (1, 1)))])
  for other in results[1:]:
    for a, b in zip(results[0], other):
      np.testing.assert_array_equal(a, b)


@needs_kernel
def test_under_vmap_over_members():
  """vmapped seed ensembles run the kernels once per member."""
  x, k = _random((3, 2, 9, 7, 16), 4), _random((3, 3, 3, 16, 4), 5)
  ours = lambda x, k, strides, padding: conv.conv_general_dilated(
      x, k, strides, padding, dimension_numbers=NHWC)
  batched = jax.vmap(lambda x, k: _grads(ours, x, k, (2, 2), 'SAME'))(x, k)
  for i in range(3):
    dx, dk = _grads(_plain, x[i], k[i], (2, 2), 'SAME')
    assert _rel(dx, batched[0][i]) <= 1e-5
    assert _rel(dk, batched[1][i]) <= 1e-5
  hlo = jax.jit(jax.vmap(lambda x, k: _grads(ours, x, k, (2, 2), 'SAME'))).lower(x, k).as_text()
  assert all(_calls(hlo, t) for t in (kernels.CONV, kernels.INPUT_GRAD, kernels.WEIGHT_GRAD))


# ---- bfloat16: the AMX kernel, and the float32 kernels on bfloat16 values ----

needs_amx = pytest.mark.skipif(
    not kernels.amx_available(),
    reason='this CPU has no AMX-BF16 (or the kernels are not built): kernels.amx_available()')


def _bf16(shape, seed):
  return _random(shape, seed).astype(jnp.bfloat16)


def _f32(a):
  return a.astype(jnp.float32)


AMX_SHAPES = [  # input, kernel, strides, padding
    ((2, 7, 9, 1), (3, 3, 1, 3), (2, 2), 'SAME'),        # stride 2, one channel, odd sizes
    ((2, 13, 33, 32), (3, 3, 32, 20), (1, 1), 'SAME'),   # 2 full tiles and 1 partial; 20 outputs
    ((1, 24, 32, 64), (3, 3, 64, 48), (1, 1), 'SAME'),   # inner tiles read in place; 3 blocks
    ((2, 11, 17, 40), (2, 3, 40, 33), (2, 1), ((0, 1), (2, 0))),  # channels padded to 64
    ((1, 12, 16, 96), (3, 3, 96, 32), (1, 1), 'SAME'),   # one tile a row: pairs span rows
    ((1, 9, 10, 33), (1, 1, 33, 5), (1, 1), 'VALID'),    # 1x1
    ((1, 10, 40, 32), (3, 3, 32, 16), (1, 1), ((-1, 1), (1, -1))),  # negative pads crop
    ((1, 9, 70, 32), (3, 3, 32, 32), (2, 2), 'SAME'),    # stride 2, a tile in place
    ((2, 40, 130, 32), (3, 3, 32, 16), (1, 1), 'SAME'),  # kernel gradient: 3 chunks, wide rows
    ((1, 5, 8, 32), (3, 3, 32, 16), (1, 1), ((1, 1), (40, -40))),  # all windows off the image
]


@needs_amx
@pytest.mark.parametrize('shape,kernel,strides,padding', AMX_SHAPES)
def test_the_amx_kernel_matches_xla_on_bfloat16_values(shape, kernel, strides, padding):
  """Products of bfloat16 values are exact in float32: the float32 result is XLA's float32
  convolution of the same values within 1e-5, the bfloat16 one exactly that, rounded."""
  x, k = _bf16(shape, 0), _bf16(kernel, 1)
  pads = _pads(shape, kernel, strides, padding)
  ref = _plain(_f32(x), _f32(k), strides, pads)
  lead = (pads[0][0], pads[1][0])
  y = kernels.conv2d_bf16(x, k, strides, lead, ref.shape[1:3], out_dtype=jnp.float32)
  assert y.dtype == jnp.float32 and _rel(ref, y) <= 1e-5
  if strides == (1, 1):  # the kernel gradient, likewise
    g = _bf16(ref.shape, 2)
    dk_ref = jax.vjp(lambda k: _plain(_f32(x), k, strides, pads), _f32(k))[1](_f32(g))[0]
    dk = kernels.conv2d_bf16_weight_grad(x, g, lead, kernel[:2])
    assert dk.dtype == jnp.float32 and _rel(dk_ref, dk) <= 1e-5
  yb = kernels.conv2d_bf16(x, k, strides, lead, ref.shape[1:3])
  assert yb.dtype == jnp.bfloat16
  np.testing.assert_array_equal(_f32(yb), _f32(y.astype(jnp.bfloat16)))
  # A float32 kernel is rounded as XLA's conversion rounds it (ties, tiny values, inf, NaN).
  k32 = _random(kernel, 1) * (1 + 2.0 ** -8)
  k32 = k32.at[0, 0, 0, 0].set(1 + 2.0 ** -8).at[-1, -1, -1, -1].set(1e-39)
  np.testing.assert_array_equal(
      _f32(kernels.conv2d_bf16(x, k32, strides, lead, ref.shape[1:3])),
      _f32(kernels.conv2d_bf16(x, k32.astype(jnp.bfloat16), strides, lead, ref.shape[1:3])))
  k32 = k32.at[0, 0, 0, 0].set(jnp.inf).at[-1, -1, -1, -1].set(jnp.nan)
  np.testing.assert_array_equal(
      _f32(kernels.conv2d_bf16(x, k32, strides, lead, ref.shape[1:3])),
      _f32(kernels.conv2d_bf16(x, k32.astype(jnp.bfloat16), strides, lead, ref.shape[1:3])))


@needs_amx
def test_the_amx_result_does_not_depend_on_the_thread_count(monkeypatch):
  x, k = _bf16((2, 30, 40, 64), 2), _bf16((3, 3, 64, 48), 3)
  results = []
  for threads in (1, 2, 5):
    monkeypatch.setattr(kernels, '_threads', lambda t=threads: t)
    results.append([np.asarray(kernels.conv2d_bf16(x, k, (1, 1), (1, 1), (30, 40),
                                                   out_dtype=jnp.float32)),
                    np.asarray(kernels.conv2d_bf16_weight_grad(x, _bf16((2, 30, 40, 48), 4),
                                                               (1, 1), (3, 3)))])
  for other in results[1:]:
    for a, b in zip(results[0], other):
      np.testing.assert_array_equal(a, b)


@needs_kernel
def test_without_amx_the_bfloat16_kernel_says_so(monkeypatch):
  monkeypatch.setattr(kernels, 'amx_available', lambda: False)
  with pytest.raises(RuntimeError, match='AMX-BF16'):
    kernels.conv2d_bf16(_bf16((1, 4, 4, 32), 0), _bf16((3, 3, 32, 16), 1), (1, 1), (1, 1),
                        (4, 4))


def test_bfloat16_routing():
  """With AMX, bfloat16 forwards and stride-1 input and kernel gradients take it; the rest, and
  every bfloat16 convolution without AMX, route as float32's. float32 never takes it."""
  big = (96, 128)
  r = lambda kernel, strides, out_hw, amx: tuple(conv.routes(
      kernel, strides, big, out_hw, jnp.bfloat16, amx=amx).values())
  assert r((3, 3, 64, 64), (1, 1), big, True) == ('amx', 'amx', 'amx')
  assert r((3, 3, 3, 32), (1, 1), big, True) == ('amx', 'amx', 'amx')  # RGB layer
  assert r((3, 3, 64, 128), (2, 2), (48, 64), True) == ('amx', 'gemm', 'gemm')  # col2im
  assert r((3, 3, 64, 64), (1, 1), big, False) == ('winograd',) * 3
  assert conv.routes((3, 3, 64, 64), (1, 1), big, big, amx=True)['forward'] == 'winograd'


BF16_SHAPES = [
    ((2, 7, 9, 1), (3, 3, 1, 3), (2, 2), 'SAME'),        # GEMM kernels on float32 values
    ((1, 12, 16, 32), (3, 3, 32, 40), (1, 1), 'SAME'),   # AMX all three ways
    ((2, 11, 17, 40), (3, 3, 40, 32), (2, 2), 'SAME'),   # AMX forward, col2im input gradient
    ((2, 6, 5, 3), (3, 3, 3, 32), (1, 1), 'SAME'),       # RGB-like: channels padded
]


WITH_AND_WITHOUT_AMX = pytest.mark.parametrize(
    'amx', [False, pytest.param(True, marks=needs_amx)])


@needs_kernel
@WITH_AND_WITHOUT_AMX
@pytest.mark.parametrize('shape,kernel,strides,padding', BF16_SHAPES)
def test_bfloat16_gradients_match_jax_grad(monkeypatch, amx, shape, kernel, strides, padding):
  """`conv._conv` on bfloat16 operands: the output and both gradients are XLA's float32 ones on
  the same values, rounded to bfloat16 (all within one bfloat16 rounding, nearly all equal),
  with AMX where asked for and the float32 kernels otherwise."""
  monkeypatch.setattr(kernels, 'amx_available', lambda: amx)
  x, k = _bf16(shape, 0), _bf16(kernel, 1)
  pads = _pads(shape, kernel, strides, padding)
  ours = lambda x, k: conv._conv(x, k, strides, pads)
  ref = lambda x, k: _plain(_f32(x), _f32(k), strides, pads).astype(jnp.bfloat16)
  y, vjp = jax.vjp(ours, x, k)
  y_ref, vjp_ref = jax.vjp(ref, x, k)
  g = _bf16(y.shape, 2)
  for a, b in zip((y, *vjp(g)), (y_ref, *vjp_ref(g))):
    assert a.dtype == b.dtype == jnp.bfloat16
    a, b = np.asarray(_f32(a)), np.asarray(_f32(b))
    assert np.all(np.abs(a - b) <= 2.0 ** -7 * np.abs(b) + 1e-5 * np.max(np.abs(b)))
    assert np.mean(a == b) >= 0.99
  def both(x, k):
    y, vjp = jax.vjp(ours, x, k)
    return y, vjp(g)
  hlo = jax.jit(both).lower(x, k).as_text()
  route = conv.routes(kernel, strides, shape[1:3], y.shape[1:3], jnp.bfloat16)
  assert hlo.count(f'@{kernels.CONV_BF16}(') == sum(
      route[p] == 'amx' for p in ('forward', 'input_grad'))
  assert _calls(hlo, kernels.CONV_BF16_WEIGHT_GRAD) == (route['kernel_grad'] == 'amx')
  assert amx or 'amx' not in route.values()


@needs_kernel
@WITH_AND_WITHOUT_AMX
@pytest.mark.parametrize('strides', [(1, 1), (2, 2)])
def test_a_float32_kernel_with_a_bfloat16_input_is_rounded_as_flax_would(monkeypatch, amx,
                                                                         strides):
  """`promote_keep_params` leaves the kernel float32: the convolution, both gradients and
  XLA's path ('xla') are then bit for bit those of the kernel cast to bfloat16 first (flax's
  own promote_dtype), the kernel gradient in float32."""
  monkeypatch.setattr(kernels, 'amx_available', lambda: amx)
  x, k = _bf16((2, 12, 16, 32), 0), _random((3, 3, 32, 40), 1)
  for impl in ('auto', 'xla'):
    fn = conv.for_impl(impl)
    mixed = lambda x, k: fn(x, k, strides, 'SAME', dimension_numbers=NHWC)
    cast = lambda x, k: fn(x, k.astype(jnp.bfloat16), strides, 'SAME', dimension_numbers=NHWC)
    (y0, vjp0), (y1, vjp1) = jax.vjp(mixed, x, k), jax.vjp(cast, x, k)
    g = _bf16(y0.shape, 2)
    for a, b in zip((y0, *vjp0(g)), (y1, *vjp1(g))):
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(_f32(a), _f32(b))
    assert vjp0(g)[1].dtype == jnp.float32


@needs_kernel
def test_dispatch_covers_the_models_convolutions_only():
  """Float32 and bfloat16 NHWC convolutions take the kernels, the RGB input layer's too;
  float16, groups, dilation and other layouts are lax's, unchanged."""
  def takes_kernel(x, k, **kw):
    f = lambda k: jnp.sum(conv.conv_general_dilated(x, k, (1, 1), 'SAME', **kw))
    hlo = jax.jit(jax.grad(f)).lower(k).as_text()
    return any(_calls(hlo, t) for t in (kernels.WEIGHT_GRAD, kernels.CONV_BF16_WEIGHT_GRAD))

  c = 3
  assert takes_kernel(jnp.ones((1, 8, 8, c)), jnp.ones((3, 3, c, 4)), dimension_numbers=NHWC)
  assert not takes_kernel(jnp.ones((1, 8, 8, c)), jnp.ones((3, 3, c, 4)),
                          dimension_numbers=NHWC, rhs_dilation=(2, 2))
  assert takes_kernel(jnp.ones((1, 8, 8, c), jnp.bfloat16),
                      jnp.ones((3, 3, c, 4), jnp.bfloat16), dimension_numbers=NHWC)
  assert not takes_kernel(jnp.ones((1, 8, 8, c), jnp.float16),
                          jnp.ones((3, 3, c, 4), jnp.float16), dimension_numbers=NHWC)
  assert not takes_kernel(jnp.ones((1, 8, 8, 2 * c)), jnp.ones((3, 3, c, 4)),
                          dimension_numbers=NHWC, feature_group_count=2)
  assert not takes_kernel(jnp.ones((1, c, 8, 8)), jnp.ones((4, c, 3, 3)),
                          dimension_numbers=('NCHW', 'OIHW', 'NCHW'))


def test_flax_conv_takes_it_with_the_same_parameters():
  x = _random((2, 9, 7, 16), 6)
  plain = nn.Conv(4, (3, 3), strides=(2, 2), padding='SAME')
  ours = nn.Conv(4, (3, 3), strides=(2, 2), padding='SAME',
                 conv_general_dilated=conv.conv_general_dilated)
  variables = plain.init(jax.random.key(0), x)
  assert jax.tree.structure(variables) == jax.tree.structure(ours.init(jax.random.key(0), x))
  grad = lambda m: jax.grad(lambda v: jnp.sum(jnp.sin(m.apply(v, x))))(variables)
  assert _rel(grad(plain)['params']['kernel'], grad(ours)['params']['kernel']) <= 1e-5


def test_conv_impl_config_changes_values_by_rounding_only():
  """mtl0 with model.conv_impl 'auto' (the kernels, where built) and 'xla': the same
  parameters, outputs and gradients within rounding."""
  cfg = get_config().model
  cfg.features, cfg.cls_hidden = (8, 16, 32), 8
  x = jnp.asarray(np.random.default_rng(7).uniform(size=(2, 16, 16, 3)), jnp.float32)

  def run(conv_impl):
    cfg.conv_impl = conv_impl
    model = models.create_model(cfg)
    variables = model.init(jax.random.key(0), x)

    def loss(params):
      out, _ = model.apply({**variables, 'params': params}, x, train=True,
                           mutable=['batch_stats'])
      return jnp.sum(jnp.sin(out['seg_logits'])) + jnp.sum(out['cls_logits'] ** 2), out
    hlo = jax.jit(jax.grad(loss, has_aux=True)).lower(variables['params']).as_text()
    return (variables, *jax.grad(loss, has_aux=True)(variables['params']), hlo)

  v0, g0, out0, hlo0 = run('xla')
  v1, g1, out1, hlo1 = run('auto')
  jax.tree.map(np.testing.assert_array_equal, v0, v1)
  for a, b in zip(jax.tree.leaves(out0), jax.tree.leaves(out1)):
    assert _rel(a, b) <= 1e-5
  targets = (kernels.CONV, kernels.INPUT_GRAD, kernels.WEIGHT_GRAD, kernels.WINOGRAD,
             kernels.WINOGRAD_WEIGHT_GRAD)
  assert not any(_calls(hlo0, t) for t in targets)
  assert all(_calls(hlo1, t) == kernels.available() for t in targets)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
    if np.max(np.abs(a)) > 1e-3:  # conv biases before BatchNorm: rounding noise only
      assert _rel(a, b) <= 1e-4, jax.tree_util.keystr(path)


def test_an_unknown_conv_impl_is_a_config_error():
  c = get_config()
  c.model.conv_impl = 'blas'
  with pytest.raises(ConfigError, match='model.conv_impl'):
    validate_config(c)
