"""Builds the one compiled part: the CPU kernels of the convolutions and their gradients.

Everything else is in pyproject.toml. The kernels are XLA FFI handlers
(skinmtl_jax/kernels/conv2d.cc): they need jaxlib's FFI headers and scipy-openblas32's
CBLAS header at build time (pyproject.toml's [build-system] requires both) and a C++17
compiler. The extension is optional: without a compiler the install still succeeds and the
models use XLA's convolutions (slower on CPUs, the same values up to float rounding);
`python -c "import skinmtl_jax.kernels as k; print(k.status())"` says which.
"""

import os

import setuptools


def _extensions():
  import jaxlib  # pylint: disable=g-import-not-at-top
  import scipy_openblas32  # pylint: disable=g-import-not-at-top
  includes = [os.path.join(os.path.dirname(jaxlib.__file__), 'include'),
              scipy_openblas32.get_include_dir()]
  return [setuptools.Extension(
      'skinmtl_jax.kernels._conv2d',
      sources=['skinmtl_jax/kernels/conv2d.cc'],
      language='c++',
      # -isystem: the headers' own warnings are not ours. Nothing is linked: the loader
      # (skinmtl_jax/kernels/__init__.py) hands the kernel scipy-openblas32's sgemm.
      extra_compile_args=['-std=c++17', '-O3'] + [f'-isystem{d}' for d in includes],
      extra_link_args=['-pthread'],
      optional=True)]


setuptools.setup(ext_modules=_extensions())
