"""Loading the compiled kernels (`_conv2d`, built from conv2d.cc by setup.py) and calling them.

`conv2d`, `conv2d_input_grad` and `conv2d_weight_grad` are an NHWC/HWIO float32 convolution
(any strides, leading padding of any sign) and its gradients, each computed as GEMMs over
blocks of gathered windows; `winograd_conv3x3` and `winograd_conv3x3_weight_grad` are the 3x3
stride-1 convolution and its kernel gradient by Winograd's minimal filtering (conv2d.cc says
how). `conv2d_bf16` and `conv2d_bf16_weight_grad` are the convolution of bfloat16 operands and
its stride-1 kernel gradient, accumulated in float32 on the tile unit (AMX-BF16) of the CPUs
that have one; `amx_available()` says whether this one does. Their results do not depend on
the number of threads.

`available()` says whether the kernels loaded, `status()` why not: not built (no compiler, or
SKINMTL_BUILD_KERNELS=0 at install), or built against another XLA FFI API than the installed
jaxlib's (checked before anything is registered). Each call runs on up to `threads()` threads:
SKINMTL_KERNEL_THREADS where set, else the CPUs this process may run on, capped by its
cgroup's CPU quota. SKINMTL_KERNELS_LIBRARY=PATH loads another build of `_conv2d` instead
(tests/fuzz_kernels.py --sanitize: one built with AddressSanitizer).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import math
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

CONV = 'skinmtl_conv2d'
INPUT_GRAD = 'skinmtl_conv2d_input_grad'
WEIGHT_GRAD = 'skinmtl_conv2d_weight_grad'
WINOGRAD = 'skinmtl_winograd'
WINOGRAD_WEIGHT_GRAD = 'skinmtl_winograd_weight_grad'
CONV_BF16 = 'skinmtl_conv2d_bf16'          # bfloat16 result
CONV_BF16_F32 = 'skinmtl_conv2d_bf16_f32'  # float32 result
CONV_BF16_WF32 = 'skinmtl_conv2d_bf16_wf32'  # float32 kernel (rounded inside), bfloat16 result
CONV_BF16_WEIGHT_GRAD = 'skinmtl_conv2d_bf16_weight_grad'

THREADS_VARIABLE = 'SKINMTL_KERNEL_THREADS'
LIBRARY_VARIABLE = 'SKINMTL_KERNELS_LIBRARY'


def jaxlib_ffi_api() -> tuple[int, int] | None:
  """The XLA FFI API version (major, minor) of the installed jaxlib, from the headers it ships
  (include/xla/ffi/api/c_api.h, the ones setup.py builds with); None where they are absent."""
  header = pathlib.Path(jaxlib.__file__).parent / 'include/xla/ffi/api/c_api.h'
  try:
    text = header.read_text(encoding='utf-8')
  except OSError:
    return None
  found = [re.search(rf'#define XLA_FFI_API_{part}\s+(\d+)', text)
           for part in ('MAJOR', 'MINOR')]
  return None if None in found else (int(found[0].group(1)), int(found[1].group(1)))


def _library_path() -> str | None:
  path = os.environ.get(LIBRARY_VARIABLE)
  if path:
    return path
  spec = importlib.util.find_spec('skinmtl_jax.kernels._conv2d')
  return spec.origin if spec is not None and spec.origin else None


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
  """Loads, checks and registers the kernels once. Returns (the library, 'loaded'), or (None,
  why they are not available, one line)."""
  path = _library_path()
  if path is None:
    return None, ('not built (no C++ compiler, or SKINMTL_BUILD_KERNELS=0, when the package was '
                  'installed: reinstall with a compiler, pip install -e .)')
  try:
    lib = ctypes.CDLL(path)
    built = divmod(lib.SkinmtlFfiApiVersion(), 1000)
    lib.SkinmtlBuiltWithJaxlib.restype = ctypes.c_char_p
    installed = jaxlib_ffi_api()
    if installed is not None and built != installed:
      return None, (f'built for XLA FFI API {built[0]}.{built[1]} (jaxlib '
                    f'{lib.SkinmtlBuiltWithJaxlib().decode()}), but the installed jaxlib '
                    f'{jaxlib.__version__} has {installed[0]}.{installed[1]}: rebuild them '
                    'against it with pip install --no-build-isolation -e .')
    import scipy_openblas32  # pylint: disable=g-import-not-at-top
    blas = ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(),
                                    f'lib{scipy_openblas32.get_library()}.so'))
    # One BLAS thread per GEMM: the kernels spread their GEMMs over threads themselves.
    blas.scipy_openblas_set_num_threads(1)
    # This copy's GEMM, by address: numpy and scipy bring OpenBLAS copies with the same names.
    lib.SkinmtlSetSgemm(ctypes.cast(blas.scipy_cblas_sgemm, ctypes.c_void_p))
    for target, handler in ((CONV, lib.SkinmtlConv2d),
                            (INPUT_GRAD, lib.SkinmtlConv2dInputGrad),
                            (WEIGHT_GRAD, lib.SkinmtlConv2dWeightGrad),
                            (WINOGRAD, lib.SkinmtlWinograd),
                            (WINOGRAD_WEIGHT_GRAD, lib.SkinmtlWinogradWeightGrad),
                            (CONV_BF16, lib.SkinmtlConv2dBf16),
                            (CONV_BF16_F32, lib.SkinmtlConv2dBf16F32),
                            (CONV_BF16_WF32, lib.SkinmtlConv2dBf16Wf32),
                            (CONV_BF16_WEIGHT_GRAD, lib.SkinmtlConv2dBf16WeightGrad)):
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform='cpu')
  except Exception as e:  # pylint: disable=broad-except
    # Whatever fails here (a missing symbol, OpenBLAS, jaxlib refusing the handlers) leaves
    # XLA's convolutions, which need none of it.
    return None, f'failed to load {path}: {" ".join(str(e).split())}'
  return lib, 'loaded'


def available() -> bool:
  """Whether the kernels are built and loaded (loading them on the first call)."""
  return _load()[0] is not None


def status() -> str:
  """'loaded', or why the kernels are not available (one line)."""
  return _load()[1]


@functools.cache
def amx_available() -> bool:
  """Whether `conv2d_bf16` runs here: the kernels loaded, and this CPU has AMX-BF16 and
  AVX512-BF16 (Intel Xeon since Sapphire Rapids) that Linux lets this process use."""
  lib = _load()[0]
  return lib is not None and bool(lib.SkinmtlAmxAvailable())


def cgroup_cpus(root: str = '/sys/fs/cgroup') -> int | None:
  """The CPU quota of this process's cgroup rounded up to whole CPUs (cgroup v2's cpu.max, or
  v1's cpu.cfs_quota_us over cpu.cfs_period_us), or None where there is none."""
  root = pathlib.Path(root)
  try:
    quota, period = (root / 'cpu.max').read_text().split()[:2]
  except (OSError, ValueError):
    try:
      v1 = next(p for p in (root / 'cpu', root / 'cpu,cpuacct')
                if (p / 'cpu.cfs_quota_us').exists())
      quota, period = ((v1 / f'cpu.cfs_{f}_us').read_text().strip() for f in ('quota', 'period'))
    except (StopIteration, OSError):
      return None
  try:
    quota, period = int(quota), int(period)
  except ValueError:  # 'max': no quota
    return None
  return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None


def threads() -> int:
  """How many threads one call of a kernel may use: SKINMTL_KERNEL_THREADS where set, else the
  CPUs this process may run on (its affinity), capped by its cgroup's CPU quota. Read when a
  call is traced. Calls that run at once share them (conv2d.cc's ParallelFor)."""
  setting = os.environ.get(THREADS_VARIABLE)
  if setting:
    try:
      n = int(setting)
    except ValueError:
      n = 0
    if not 1 <= n <= 4096:
      raise ValueError(f'{THREADS_VARIABLE}={setting!r}: expected a whole number of threads '
                       'from 1 to 4096 (or leave it unset: the CPUs this process may use).')
    return n
  try:
    n = len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    n = os.cpu_count() or 1
  quota = cgroup_cpus()
  return max(1, min(n, quota) if quota else n)


def _call(target: str, shape: tuple[int, ...], a: jax.Array, b: jax.Array,
          lead_pads: tuple[int, int], strides: tuple[int, int] | None = None,
          dtype=jnp.float32, out_dtype=jnp.float32, b_dtype=None) -> jax.Array:
  """The FFI call of `target` on (a, b), (N)HW(C) arrays of `dtype` (b: `b_dtype`, by default
  the same); the Winograd targets take no strides."""
  if not available():
    raise RuntimeError(f'The CPU kernels skinmtl_jax.kernels are {status()}')
  if a.dtype != dtype or b.dtype != (b_dtype or dtype):
    raise TypeError(f'{target}: {jnp.dtype(dtype).name} only, got {a.dtype} and {b.dtype}.')
  attrs = dict(pt=np.int64(lead_pads[0]), pl=np.int64(lead_pads[1]),
               threads=np.int64(threads()))
  if strides is not None:
    attrs.update(sh=np.int64(strides[0]), sw=np.int64(strides[1]))
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, out_dtype),
                          vmap_method='sequential')(a, b, **attrs)


def conv2d(x: jax.Array, w: jax.Array, strides: tuple[int, int], lead_pads: tuple[int, int],
           out_hw: tuple[int, int]) -> jax.Array:
  """The convolution y (N, Ho, Wo, O) of x (N, H, W, C) with w (kh, kw, C, O).

  Output pixel (i, j) reads input rows strides[0]*i - lead_pads[0] + (0..kh-1) and columns
  likewise; (Ho, Wo) = `out_hw` fixes the trailing padding.
  """
  return _call(CONV, (x.shape[0], *out_hw, w.shape[-1]), x, w, lead_pads, strides)


def conv2d_input_grad(g: jax.Array, w: jax.Array, strides: tuple[int, int],
                      lead_pads: tuple[int, int], in_hw: tuple[int, int]) -> jax.Array:
  """The input gradient (N, H, W, C), (H, W) = `in_hw`, of `conv2d` from its output gradient."""
  return _call(INPUT_GRAD, (g.shape[0], *in_hw, w.shape[2]), g, w, lead_pads, strides)


def conv2d_weight_grad(x: jax.Array, g: jax.Array, strides: tuple[int, int],
                       lead_pads: tuple[int, int], kernel_hw: tuple[int, int]) -> jax.Array:
  """The kernel gradient (kh, kw, C, O) of `conv2d` from its input and its output gradient."""
  return _call(WEIGHT_GRAD, (*kernel_hw, x.shape[-1], g.shape[-1]), x, g, lead_pads,
               strides)


def winograd_conv3x3(x: jax.Array, w: jax.Array, lead_pads: tuple[int, int],
                     out_hw: tuple[int, int]) -> jax.Array:
  """`conv2d` of a 3x3 kernel w (3, 3, C, O) at stride 1, by Winograd's F(2x2, 3x3): 2.25x
  fewer multiplications, the same values up to float32 rounding."""
  if w.shape[:2] != (3, 3):
    raise ValueError(f'winograd_conv3x3: a 3x3 kernel, got {w.shape}.')
  return _call(WINOGRAD, (x.shape[0], *out_hw, w.shape[-1]), x, w, lead_pads)


def winograd_conv3x3_weight_grad(x: jax.Array, g: jax.Array,
                                 lead_pads: tuple[int, int]) -> jax.Array:
  """The kernel gradient (3, 3, C, O) of `winograd_conv3x3` from its input and output gradient,
  by Winograd's F(3x3, 2x2)."""
  return _call(WINOGRAD_WEIGHT_GRAD, (3, 3, x.shape[-1], g.shape[-1]), x, g, lead_pads)


def _require_amx(name: str) -> None:
  if not amx_available():
    raise RuntimeError(f'{name} needs a CPU with AMX-BF16 and AVX512-BF16 (Intel Xeon since '
                       'Sapphire Rapids); this one has none (or Linux refused the tile data).')


def conv2d_bf16(x: jax.Array, w: jax.Array, strides: tuple[int, int],
                lead_pads: tuple[int, int], out_hw: tuple[int, int],
                out_dtype=jnp.bfloat16) -> jax.Array:
  """`conv2d` of bfloat16 x and w on AMX, accumulated in float32; the result in `out_dtype`
  (bfloat16, rounded to nearest even, or float32). The products of bfloat16 values are exact in
  float32: the float32 result is XLA's float32 convolution of the same values up to the order
  of the sums. w may also be float32: it is then rounded to bfloat16 inside (as
  `w.astype(jnp.bfloat16)` would, without that conversion's pass over w; bfloat16 result
  only). Raises where `amx_available()` is False."""
  _require_amx('conv2d_bf16')
  out_dtype = jnp.dtype(out_dtype)
  if out_dtype not in (jnp.bfloat16, jnp.float32):
    raise TypeError(f'conv2d_bf16: out_dtype bfloat16 or float32, got {out_dtype}.')
  if w.dtype == jnp.float32 and out_dtype == jnp.bfloat16:
    target = CONV_BF16_WF32
  else:
    w = w.astype(jnp.bfloat16)
    target = CONV_BF16 if out_dtype == jnp.bfloat16 else CONV_BF16_F32
  return _call(target, (x.shape[0], *out_hw, w.shape[-1]), x, w, lead_pads, strides,
               dtype=jnp.bfloat16, out_dtype=out_dtype, b_dtype=w.dtype)


def conv2d_bf16_weight_grad(x: jax.Array, g: jax.Array, lead_pads: tuple[int, int],
                            kernel_hw: tuple[int, int]) -> jax.Array:
  """The kernel gradient (kh, kw, C, O), float32, of a stride-1 `conv2d` of bfloat16 x from its
  bfloat16 output gradient g, on AMX: XLA's float32 kernel gradient of the same values up to
  the order of the sums. Raises where `amx_available()` is False."""
  _require_amx('conv2d_bf16_weight_grad')
  return _call(CONV_BF16_WEIGHT_GRAD, (*kernel_hw, x.shape[-1], g.shape[-1]), x, g, lead_pads,
               dtype=jnp.bfloat16)
