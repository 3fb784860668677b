"""CPU kernels for the 2-D convolution and its gradients, registered as XLA FFI targets.

`conv2d`, `conv2d_input_grad` and `conv2d_weight_grad` are an NHWC/HWIO float32 convolution
(any strides, leading padding of any sign) and its gradients, each computed as GEMMs over
blocks of gathered windows; `winograd_conv3x3` and `winograd_conv3x3_weight_grad` are the 3x3
stride-1 convolution and its kernel gradient by Winograd's minimal filtering (conv2d.cc says
how). `conv2d_bf16` and `conv2d_bf16_weight_grad` are the convolution of bfloat16 operands and
its stride-1 kernel gradient, accumulated in float32 on the tile unit (AMX-BF16) of the CPUs
that have one; `amx_available()` says whether this one does.
The models reach them through `skinmtl_jax.models.conv`, never directly. They are built by
`pip install` (setup.py) where a C++ compiler is present; `available()` says whether they
loaded, `status()` why not. Their results do not depend on the number of threads.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
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


@functools.cache
def _load() -> str | None:
  """Loads and registers the kernels once. Returns None, or why they are not available."""
  spec = importlib.util.find_spec('skinmtl_jax.kernels._conv2d')
  if spec is None or not spec.origin:
    return ('not built (no C++ compiler when the package was installed? reinstall with one: '
            "pip install -e .)")
  try:
    import scipy_openblas32  # pylint: disable=g-import-not-at-top
    blas = ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(),
                                    f'lib{scipy_openblas32.get_library()}.so'))
    # One BLAS thread per GEMM: the kernels spread their GEMMs over threads themselves.
    blas.scipy_openblas_set_num_threads(1)
    lib = ctypes.CDLL(spec.origin)
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
  except (ImportError, OSError, AttributeError) as e:
    return f'failed to load {spec.origin}: {e}'
  return None


def available() -> bool:
  """Whether the kernels are built and loaded (loading them on the first call)."""
  return _load() is None


@functools.cache
def amx_available() -> bool:
  """Whether `conv2d_bf16` runs here: the kernels loaded, and this CPU has AMX-BF16 and
  AVX512-BF16 (Intel Xeon since Sapphire Rapids) that Linux lets this process use."""
  if not available():
    return False
  lib = ctypes.CDLL(importlib.util.find_spec('skinmtl_jax.kernels._conv2d').origin)
  return bool(lib.SkinmtlAmxAvailable())


def status() -> str:
  why = _load()
  return 'loaded' if why is None else why


def _threads() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


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
               threads=np.int64(_threads()))
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
