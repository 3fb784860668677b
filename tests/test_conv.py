"""The CPU convolution kernels (skinmtl_jax/kernels), their routing, and the choice of the
models' convolution (skinmtl_jax/models/conv.py), against XLA's convolution, jax.grad of it
and a float64 reference (tests/fuzz_kernels.py)."""

import dataclasses
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.conv_variants import _rel  # largest |a - b| over the largest |a|
from conftest import ROOT
import fuzz_kernels
from skinmtl_jax import kernels, models
from skinmtl_jax.config_base import ConfigError, get_config, validate_config
from skinmtl_jax.kernels import ffi
from skinmtl_jax.models import conv, mtl, resnet, unet

NHWC = ('NHWC', 'HWIO', 'NHWC')
XLA = conv.xla_conv_general_dilated


def _ours(amx=False):
  """The convolution a model created on a CPU with the kernels computes with."""
  return kernels.KernelConvolution(XLA, amx)



def _calls(hlo: str, target: str) -> bool:
  """Whether the lowered program calls the FFI target (names are prefixes of one another)."""
  return f'@{target}(' in hlo


needs_kernel = pytest.mark.skipif(not kernels.available(),
                                  reason=f'CPU kernels: {kernels.status()}')


def _random(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_the_kernel_is_built_where_ci_runs():
  """A failed build would silently fall back to XLA's (slow) gradient: CI must notice. Its
  no-compiler job (SKINMTL_REQUIRE_KERNELS=0) checks the converse: nothing built, XLA's
  convolutions in the models."""
  required = os.environ.get('SKINMTL_REQUIRE_KERNELS')
  if required not in ('0', '1'):
    pytest.skip('SKINMTL_REQUIRE_KERNELS is not set (.ci/run sets it)')
  assert platform.system() == 'Linux'
  if required == '1':
    assert kernels.available(), kernels.status()
  else:
    assert not kernels.available() and kernels.status().startswith('not built')
    assert conv.select('auto') is XLA


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
  """`KernelConvolution` (the custom VJP, routed by shape) within 1e-5 of jax.grad of the plain
  convolution, with the routed kernels really in the program."""
  x, k = _random(shape, 0), _random(kernel, 1)
  pads = _pads(shape, kernel, strides, padding)
  ours = lambda x, k, strides, padding: _ours()(x, k, strides, pads, dimension_numbers=NHWC)
  (dx0, dk0), (dx1, dk1) = (_grads(_plain, x, k, strides, padding),
                            _grads(ours, x, k, strides, padding))
  assert _rel(_plain(x, k, strides, padding), ours(x, k, strides, pads)) <= 1e-5
  assert _rel(dx0, dx1) <= 1e-5
  assert _rel(dk0, dk1) <= 1e-5
  hlo = jax.jit(lambda x, k: _grads(ours, x, k, strides, padding)).lower(x, k).as_text()
  route = kernels.routes(kernel, strides, shape[1:3],
                         _plain(x, k, strides, padding).shape[1:3])
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
      kernels.routes(kernel, strides, in_hw, out_hw).values())
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
    monkeypatch.setenv(ffi.THREADS_VARIABLE, str(threads))
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


def _cpu_flags() -> set[str]:
  try:
    text = pathlib.Path('/proc/cpuinfo').read_text()
  except OSError:
    return set()
  return set(next((line.split(':', 1)[1].split() for line in text.splitlines()
                   if line.startswith('flags')), []))


# OpenBLAS core types and the instructions each needs: Haswell's kernels are what AMD EPYC
# machines get (with an L2 of 512 KB), SkylakeX's what Intel Xeons get.
CORE_TYPES = {'Haswell': ({'avx2', 'fma'}, {'OPENBLAS_L2_SIZE': '512'}),
              'SkylakeX': ({'avx512f', 'avx512bw', 'avx512vl', 'avx512dq', 'avx512cd'}, {})}


@needs_kernel
@pytest.mark.parametrize('core', sorted(CORE_TYPES))
def test_the_result_does_not_depend_on_the_thread_count_on_each_core_type(core):
  """OpenBLAS rounds a GEMM differently for different shapes on some core types: a work split
  by the thread count changed the kernel gradient on Haswell's (87 of 1152 values). Each core
  type that this CPU can run, in a process of its own (the type is read when OpenBLAS loads)."""
  needs, env = CORE_TYPES[core]
  if not needs <= _cpu_flags():
    pytest.skip(f'this CPU cannot run OpenBLAS\'s {core} kernels (needs {sorted(needs)})')
  r = subprocess.run([sys.executable, str(ROOT / 'tests/kernel_threads_check.py')],
                     env=dict(os.environ, OPENBLAS_CORETYPE=core, **env), capture_output=True,
                     text=True, timeout=600, check=False)
  assert r.stdout.splitlines()[:1] == [core], r.stdout + r.stderr  # OpenBLAS took the type
  assert r.returncode == 0, r.stdout + r.stderr[-3000:]


def test_threads_follow_the_setting_then_the_cgroup_quota(monkeypatch, tmp_path):
  monkeypatch.setenv(ffi.THREADS_VARIABLE, '3')
  assert kernels.threads() == 3
  for bad in ('0', 'two', '-1', '5000'):
    monkeypatch.setenv(ffi.THREADS_VARIABLE, bad)
    with pytest.raises(ValueError, match=ffi.THREADS_VARIABLE):
      kernels.threads()
  monkeypatch.delenv(ffi.THREADS_VARIABLE)
  affinity = len(os.sched_getaffinity(0))
  assert kernels.threads() == min(affinity, ffi.cgroup_cpus() or affinity)
  # cgroup v2: cpu.max is "quota period", or "max period" for none; v1: cfs_quota_us (-1: none).
  (tmp_path / 'cpu.max').write_text('150000 100000\n')
  assert ffi.cgroup_cpus(tmp_path) == 2
  (tmp_path / 'cpu.max').write_text('max 100000\n')
  assert ffi.cgroup_cpus(tmp_path) is None
  (tmp_path / 'cpu.max').unlink()
  (tmp_path / 'cpu').mkdir()
  (tmp_path / 'cpu/cpu.cfs_quota_us').write_text('50000\n')
  (tmp_path / 'cpu/cpu.cfs_period_us').write_text('100000\n')
  assert ffi.cgroup_cpus(tmp_path) == 1
  (tmp_path / 'cpu/cpu.cfs_quota_us').write_text('-1\n')
  assert ffi.cgroup_cpus(tmp_path) is None
  assert ffi.cgroup_cpus(tmp_path / 'absent') is None
  monkeypatch.setattr(ffi, 'cgroup_cpus', lambda: 1)
  assert kernels.threads() == 1  # a quota below the affinity caps it


@needs_kernel
def test_under_vmap_over_members():
  """vmapped seed ensembles run the kernels once per member."""
  x, k = _random((3, 2, 9, 7, 16), 4), _random((3, 3, 3, 16, 4), 5)
  ours = lambda x, k, strides, padding: _ours()(x, k, strides, padding, dimension_numbers=NHWC)
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
    monkeypatch.setenv(ffi.THREADS_VARIABLE, str(threads))
    results.append([np.asarray(kernels.conv2d_bf16(x, k, (1, 1), (1, 1), (30, 40),
                                                   out_dtype=jnp.float32)),
                    np.asarray(kernels.conv2d_bf16_weight_grad(x, _bf16((2, 30, 40, 48), 4),
                                                               (1, 1), (3, 3)))])
  for other in results[1:]:
    for a, b in zip(results[0], other):
      np.testing.assert_array_equal(a, b)


@needs_kernel
def test_without_amx_the_bfloat16_kernel_says_so(monkeypatch):
  monkeypatch.setattr(ffi, 'amx_available', lambda: False)
  with pytest.raises(RuntimeError, match='AMX-BF16'):
    kernels.conv2d_bf16(_bf16((1, 4, 4, 32), 0), _bf16((3, 3, 32, 16), 1), (1, 1), (1, 1),
                        (4, 4))


def test_bfloat16_routing():
  """With AMX, bfloat16 forwards and stride-1 input and kernel gradients take it; the rest, and
  every bfloat16 convolution without AMX, route as float32's. float32 never takes it."""
  big = (96, 128)
  r = lambda kernel, strides, out_hw, amx: tuple(kernels.routes(
      kernel, strides, big, out_hw, jnp.bfloat16, amx=amx).values())
  assert r((3, 3, 64, 64), (1, 1), big, True) == ('amx', 'amx', 'amx')
  assert r((3, 3, 3, 32), (1, 1), big, True) == ('amx', 'amx', 'amx')  # RGB layer
  assert r((3, 3, 64, 128), (2, 2), (48, 64), True) == ('amx', 'gemm', 'gemm')  # col2im
  assert r((3, 3, 64, 64), (1, 1), big, False) == ('winograd',) * 3
  assert kernels.routes((3, 3, 64, 64), (1, 1), big, big, amx=True)['forward'] == 'winograd'


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
def test_bfloat16_gradients_match_jax_grad(amx, shape, kernel, strides, padding):
  """`KernelConvolution` on bfloat16 operands: the output and both gradients are XLA's float32
  ones on the same values, rounded to bfloat16 (all within one bfloat16 rounding, nearly all
  equal), with AMX where asked for and the float32 kernels otherwise."""
  x, k = _bf16(shape, 0), _bf16(kernel, 1)
  pads = _pads(shape, kernel, strides, padding)
  ours = lambda x, k: _ours(amx)(x, k, strides, pads, dimension_numbers=NHWC)
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
  route = kernels.routes(kernel, strides, shape[1:3], y.shape[1:3], jnp.bfloat16, amx)
  assert hlo.count(f'@{kernels.CONV_BF16}(') == sum(
      route[p] == 'amx' for p in ('forward', 'input_grad'))
  assert _calls(hlo, kernels.CONV_BF16_WEIGHT_GRAD) == (route['kernel_grad'] == 'amx')
  assert amx or 'amx' not in route.values()


@needs_kernel
@WITH_AND_WITHOUT_AMX
@pytest.mark.parametrize('strides', [(1, 1), (2, 2)])
def test_a_float32_kernel_with_a_bfloat16_input_is_rounded_as_flax_would(amx, strides):
  """`promote_keep_params` leaves the kernel float32: the convolution, both gradients and
  XLA's path ('xla') are then bit for bit those of the kernel cast to bfloat16 first (flax's
  own promote_dtype), the kernel gradient in float32."""
  x, k = _bf16((2, 12, 16, 32), 0), _random((3, 3, 32, 40), 1)
  for fn in (_ours(amx), XLA):
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
    f = lambda k: jnp.sum(_ours()(x, k, (1, 1), 'SAME', **kw))
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
                 conv_general_dilated=conv.select('auto'))
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


# ---- What the kernels refuse, and what happens without them ----

def _ffi(target, a, b, out_shape, **attrs):
  """The FFI call of `target` with whatever attributes, past the wrappers' own checks."""
  attrs = {k: np.int64(v) for k, v in attrs.items()}
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(out_shape, jnp.float32))(a, b, **attrs)


GOOD = dict(sh=1, sw=1, pt=1, pl=1, threads=2)
BAD_GEOMETRY = [  # target, input, kernel, output, attributes, what the error says
    (kernels.CONV, (1, 4, 4, 3), (3, 3, 3, 2), (1, 4, 4, 2), dict(GOOD, sh=0), 'strides outside'),
    (kernels.CONV, (1, 4, 4, 3), (3, 3, 3, 2), (1, 4, 4, 2), dict(GOOD, sw=2**40),
     'strides outside'),
    (kernels.CONV, (1, 4, 4, 3), (3, 3, 3, 2), (1, 4, 4, 2), dict(GOOD, pt=2**40),
     'leading pads outside'),
    (kernels.INPUT_GRAD, (1, 4, 4, 2), (3, 3, 3, 2), (1, 4, 4, 3), dict(GOOD, pl=-2**40),
     'leading pads outside'),
    (kernels.WEIGHT_GRAD, (1, 4, 4, 3), (1, 4, 4, 2), (3, 3, 3, 2), dict(GOOD, threads=0),
     'threads outside'),
    (kernels.CONV, (1, 4, 4, 3), (3, 3, 4, 2), (1, 4, 4, 2), GOOD, "kernel's C"),
    (kernels.CONV, (2, 4, 4, 3), (3, 3, 3, 2), (1, 4, 4, 2), GOOD, "output's N"),
    (kernels.WINOGRAD, (1, 6, 6, 3), (5, 5, 3, 2), (1, 4, 4, 2),
     dict(pt=1, pl=1, threads=2), 'a 3x3 kernel'),
    (kernels.WINOGRAD_WEIGHT_GRAD, (1, 6, 6, 3), (1, 6, 6, 2), (3, 3, 3, 2),
     dict(pt=1, pl=1, threads=5000), 'threads outside'),
    (kernels.CONV, (1, 4, 4, 3), (3, 3, 3), (1, 4, 4, 2), GOOD, 'expected an input'),
]


@needs_kernel
@pytest.mark.parametrize('target,a,b,out,attrs,says', BAD_GEOMETRY)
def test_bad_geometry_is_an_ffi_error_naming_the_kernel_and_the_shapes(target, a, b, out, attrs,
                                                                       says):
  """Checked before a buffer is touched (conv2d.cc's Call::Check): an error that names the
  kernel and the shapes, not undefined behaviour."""
  with pytest.raises(Exception, match=rf'INVALID_ARGUMENT: {target} \(input .*{says}'):
    _ffi(target, jnp.ones(a), jnp.ones(b), out, **attrs).block_until_ready()


@needs_kernel
def test_out_of_memory_is_an_ffi_error_not_an_abort():
  """A buffer the kernel cannot allocate (here: the 1 GB of windows of a 16x16 kernel over 4096
  channels, in each of two threads, under an address-space limit of 512 MB more than the
  process has) is an error naming the kernel and the shapes; std::bad_alloc used to end the
  process (std::terminate), from the caller's thread or a worker's."""
  script = textwrap.dedent('''
      import re, resource, sys
      sys.path.insert(0, sys.argv[1])
      import jax, jax.numpy as jnp
      from skinmtl_jax import kernels
      x, w = jnp.ones((2, 1, 1, 4096)), jnp.ones((16, 16, 4096, 1))
      f = jax.jit(lambda x, w: kernels.conv2d(x, w, (1, 1), (15, 15), (16, 16)))
      f = f.lower(x, w).compile()
      vm = int(re.search(r'VmSize:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))
      resource.setrlimit(resource.RLIMIT_AS, (vm * 1024 + (512 << 20), resource.RLIM_INFINITY))
      try:
        f(x, w).block_until_ready()
        print('no error')
      except Exception as e:  # jax's runtime error
        print(e)
      ''')
  r = subprocess.run([sys.executable, '-c', script, str(ROOT)], capture_output=True, text=True,
                     env=dict(os.environ, **{ffi.THREADS_VARIABLE: '2'}), timeout=600,
                     check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  assert re.search(r'RESOURCE_EXHAUSTED: skinmtl_conv2d \(input \(2, 1, 1, 4096\), kernel '
                   r'\(16, 16, 4096, 1\), output \(2, 16, 16, 1\).*: out of memory', r.stdout), (
                       r.stdout + r.stderr[-3000:])


@pytest.fixture
def reload_kernels():
  """Loads the kernels again after the test (which changed what `ffi._load` sees)."""
  yield
  ffi._load.cache_clear()
  ffi.amx_available.cache_clear()
  conv._say_xla.cache_clear()


@needs_kernel
def test_kernels_built_for_another_ffi_api_leave_xla_convolutions(monkeypatch, caplog,
                                                                  reload_kernels):
  """The loader compares the XLA FFI API the library was built with against the installed
  jaxlib's before registering anything; a mismatch is one line in the log, and XLA's
  convolutions."""
  del reload_kernels
  monkeypatch.setattr(ffi, 'jaxlib_ffi_api', lambda: (0, 999))
  ffi._load.cache_clear()
  conv._say_xla.cache_clear()
  assert not kernels.available()
  assert re.fullmatch(r'built for XLA FFI API \d+\.\d+ \(jaxlib [\w.]+\), but the installed '
                      r'jaxlib [\w.]+ has 0\.999: rebuild them against it with pip install '
                      r'--no-build-isolation -e \.', kernels.status()), kernels.status()
  with caplog.at_level('WARNING'):
    assert conv.select('auto') is XLA
    assert conv.select('auto') is XLA
  lines = [r.getMessage() for r in caplog.records if 'CPU convolutions use XLA' in r.getMessage()]
  assert len(lines) == 1 and '\n' not in lines[0] and 'FFI API' in lines[0], lines


def test_the_models_convolution_is_chosen_once_where_the_model_is_created(monkeypatch):
  """Modules carry a convolution function, never `conv_impl`; GPUs and TPUs get XLA's, and a
  model created for a GPU traces no call of the kernels."""
  for module in (mtl.SkinMTL, unet.ConvBlock, unet.EncoderStage, unet.Encoder,
                 unet.UpConv2x2, unet.DecoderLevel, unet.SegHead, resnet.ResNet50):
    assert 'conv_impl' not in {f.name for f in dataclasses.fields(module)}, module
  for platform_name in ('gpu', 'tpu'):
    assert conv.select('auto', platform=platform_name) is XLA
  assert conv.select('xla') is XLA
  with pytest.raises(ValueError, match='model.conv_impl'):
    conv.select('blas')
  ours = conv.select('auto', jnp.float32, platform='cpu')
  assert (ours == kernels.KernelConvolution(XLA, False)) if kernels.available() else ours is XLA

  cfg = get_config().model
  cfg.features, cfg.cls_hidden = (8, 16, 32), 8
  x = jnp.ones((1, 16, 16, 3))
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  model = models.create_model(cfg)
  assert model.conv_general_dilated is XLA
  variables = model.init(jax.random.key(0), x)
  grad = jax.grad(lambda v: jnp.sum(model.apply(v, x, train=True, mutable=['batch_stats'])[0][
      'seg_logits']))
  assert 'skinmtl' not in jax.jit(grad).lower(variables).as_text()


@needs_kernel
def test_fuzz_against_a_float64_reference():
  """A short run of tests/fuzz_kernels.py (2000 cases there, and under ASan + UBSan): every
  kernel on random shapes, pads of both signs, strides and channels."""
  stats, failures = fuzz_kernels.fuzz(60, seed=1, log=lambda _: None)
  assert not failures, failures
  covered = {'conv2d', 'input_grad', 'weight_grad', 'winograd', 'winograd_weight_grad',
             'routed', 'routed_bf16'}
  if kernels.amx_available():
    covered |= {'bf16', 'bf16_f32', 'bf16_wf32', 'bf16_weight_grad'}
  assert set(stats) == covered


def _build_in_a_copy(tmp_path, **env):
  """setup.py's build of the extension, in a copy of the package (its compiled library left
  out). Returns (the process, whether a library was built)."""
  for name in ('setup.py', 'pyproject.toml', 'README.md'):
    shutil.copy(ROOT / name, tmp_path / name)
  shutil.copytree(ROOT / 'skinmtl_jax', tmp_path / 'skinmtl_jax',
                  ignore=shutil.ignore_patterns('*.so', '__pycache__'))
  r = subprocess.run([sys.executable, 'setup.py', 'build_ext', '--inplace'], cwd=tmp_path,
                     env=dict(os.environ, **env), capture_output=True, text=True, timeout=600,
                     check=False)
  return r, any((tmp_path / 'skinmtl_jax/kernels').glob('_conv2d*.so'))


@pytest.mark.parametrize('condition', ['no compiler', 'no jaxlib', 'SKINMTL_BUILD_KERNELS=0'])
def test_the_package_builds_without_the_kernels(tmp_path, condition):
  """Without a compiler, without the packages that bring the headers, or when told to skip
  them, the build succeeds without the kernels (and says why)."""
  env = {}
  if condition == 'no compiler':
    env = dict(CC='/nonexistent/cc', CXX='/nonexistent/c++')
  elif condition == 'no jaxlib':  # jaxlib and scipy-openblas32 not importable
    fake = tmp_path / 'fake'
    for name in ('jaxlib', 'scipy_openblas32'):
      (fake / name).mkdir(parents=True)
      (fake / name / '__init__.py').write_text(f'raise ImportError("no {name}", name="{name}")')
    env = dict(PYTHONPATH=str(fake))
  else:
    env = dict(SKINMTL_BUILD_KERNELS='0')
  (tmp_path / 'src').mkdir()
  r, built = _build_in_a_copy(tmp_path / 'src', **env)
  assert r.returncode == 0 and not built, r.stdout + r.stderr
  says = {'no compiler': '/nonexistent/c', 'no jaxlib': 'jaxlib is not importable',
          'SKINMTL_BUILD_KERNELS=0': 'not building the CPU kernels (SKINMTL_BUILD_KERNELS=0)'}
  assert says[condition] in r.stdout + r.stderr, r.stdout + r.stderr
