"""The CPU kernel for a convolution's weight gradient, registered as an XLA FFI target.

`conv_weight_grad(x, g, kernel_hw)` is the kernel gradient of a stride-1 NHWC/HWIO convolution
from its padded input and its output gradient (conv_weight_grad.cc says how). The models reach
it through `skinmtl_jax.models.conv`, never directly. It is built by `pip install` (setup.py)
where a C++ compiler is present; `available()` says whether it loaded, `status()` why not.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np

TARGET = 'skinmtl_conv_weight_grad'


@functools.cache
def _load() -> str | None:
  """Loads and registers the kernel once. Returns None, or why it is not available."""
  spec = importlib.util.find_spec('skinmtl_jax.kernels._conv_weight_grad')
  if spec is None or not spec.origin:
    return ('not built (no C++ compiler when the package was installed? reinstall with one: '
            "pip install -e .)")
  try:
    import scipy_openblas32  # pylint: disable=g-import-not-at-top
    blas = ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(),
                                    f'lib{scipy_openblas32.get_library()}.so'))
    # One BLAS thread per GEMM: the kernel spreads its GEMMs over threads itself.
    blas.scipy_openblas_set_num_threads(1)
    lib = ctypes.CDLL(spec.origin)
    # This copy's GEMM, by address: numpy and scipy bring OpenBLAS copies with the same names.
    lib.SkinmtlSetSgemm(ctypes.cast(blas.scipy_cblas_sgemm, ctypes.c_void_p))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.SkinmtlConvWeightGrad),
                                platform='cpu')
  except (ImportError, OSError, AttributeError) as e:
    return f'failed to load {spec.origin}: {e}'
  return None


def available() -> bool:
  """Whether the kernel is built and loaded (loading it on the first call)."""
  return _load() is None


def status() -> str:
  why = _load()
  return 'loaded' if why is None else why


def _threads() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def conv_weight_grad(x: jax.Array, g: jax.Array, kernel_hw: tuple[int, int]) -> jax.Array:
  """The (kh, kw, C, O) kernel gradient of a stride-1 convolution, float32.

  x: the padded input (N, Hp, Wp, C); g: the output gradient (N, Hp - kh + 1, Wp - kw + 1, O).
  The result does not depend on the number of threads.
  """
  if not available():
    raise RuntimeError(f'The CPU kernel skinmtl_jax.kernels is {status()}')
  kh, kw = kernel_hw
  n, hp, wp, c = x.shape
  if g.shape[:3] != (n, hp - kh + 1, wp - kw + 1):
    raise ValueError(f'conv_weight_grad: output gradient {g.shape} does not fit input {x.shape} '
                     f'and kernel {kernel_hw} (stride 1).')
  grid = jnp.pad(g, ((0, 0), (0, kh - 1), (0, kw - 1), (0, 0)))
  return jax.ffi.ffi_call(
      TARGET, jax.ShapeDtypeStruct((kh, kw, c, g.shape[-1]), jnp.float32),
      vmap_method='sequential')(x.astype(jnp.float32), grid.astype(jnp.float32),
                                threads=np.int64(_threads()))
