"""Run by test_conv.py, once per OpenBLAS core type (OPENBLAS_CORETYPE, set before OpenBLAS
loads): every float32 kernel on shapes that cut its work into blocks, chunks and groups, with
1, 2, 3 and 5 threads (SKINMTL_KERNEL_THREADS). Prints OpenBLAS's core name, then one line per
kernel whose results differ between thread counts; exits 1 if any does.

    OPENBLAS_CORETYPE=Haswell OPENBLAS_L2_SIZE=512 python tests/kernel_threads_check.py
"""

import ctypes
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import scipy_openblas32  # pylint: disable=wrong-import-position

from skinmtl_jax import kernels  # pylint: disable=wrong-import-position


def _random(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def results() -> dict[str, np.ndarray]:
  x, w = _random((3, 40, 38, 16), 2), _random((3, 3, 16, 8), 3)   # kernel gradient: 1 chunk
  g = _random((3, 38, 36, 8), 4)
  big = _random((4, 64, 64, 5), 5)
  w97 = _random((3, 3, 16, 97), 7)
  x2, g2 = _random((2, 70, 66, 24), 8), _random((2, 35, 33, 40), 9)  # stride 2: 2 chunks
  x5 = _random((1, 12, 10, 70), 10)                                  # 7x7 taps in groups
  # A split of its taps by the thread count changed 3216 of 3526 values on SkylakeX's kernels.
  x6, g6 = _random((2, 29, 37, 41), 13), _random((2, 28, 37, 43), 14)
  return {
      'conv2d': kernels.conv2d(x, w, (1, 1), (0, 0), (38, 36)),
      'conv2d_input_grad': kernels.conv2d_input_grad(g, w, (1, 1), (0, 0), (40, 38)),
      'conv2d_weight_grad': kernels.conv2d_weight_grad(x, g, (1, 1), (0, 0), (3, 3)),
      'conv2d_weight_grad, stride 2': kernels.conv2d_weight_grad(x2, g2, (2, 2), (1, 1),
                                                                 (3, 3)),
      'conv2d_weight_grad, 7x7': kernels.conv2d_weight_grad(
          x5, _random((1, 12, 10, 33), 11), (1, 1), (3, 3), (7, 7)),
      'conv2d_weight_grad, 2x1': kernels.conv2d_weight_grad(x6, g6, (1, 1), (0, 0), (2, 1)),
      'conv2d_input_grad, stride 2': kernels.conv2d_input_grad(g2, _random((3, 3, 24, 40), 12),
                                                               (2, 2), (1, 1), (70, 66)),
      'winograd_conv3x3': kernels.winograd_conv3x3(x, w, (0, 0), (38, 36)),
      'winograd_conv3x3, channel groups': kernels.winograd_conv3x3(x[:1, :12, :14], w97, (1, 1),
                                                                   (12, 14)),
      'winograd_conv3x3_weight_grad': kernels.winograd_conv3x3_weight_grad(  # 4 chunks
          big, _random((4, 64, 64, 8), 6), (1, 1)),
  }


def main() -> int:
  blas = ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(),
                                  f'lib{scipy_openblas32.get_library()}.so'))
  blas.scipy_openblas_get_corename.restype = ctypes.c_char_p
  assert kernels.available(), kernels.status()
  print(blas.scipy_openblas_get_corename().decode(), flush=True)
  runs = {}
  for threads in (1, 2, 3, 5):
    os.environ[kernels.ffi.THREADS_VARIABLE] = str(threads)
    runs[threads] = {k: np.asarray(v) for k, v in results().items()}
  differ = 0
  for threads, run in runs.items():
    for name, value in run.items():
      if not np.array_equal(value, runs[1][name]):
        differ += 1
        print(f'{name}: {threads} threads differ from 1 in '
              f'{np.sum(value != runs[1][name])} of {value.size} values')
  return 1 if differ else 0


if __name__ == '__main__':
  sys.exit(main())
