"""Builds the one compiled part, where it can: the CPU kernels of the convolutions.

Everything else is in pyproject.toml. The kernels (skinmtl_jax/kernels/conv2d.cc, XLA FFI
handlers) need jaxlib's FFI headers and scipy-openblas32's CBLAS header at build time
(pyproject.toml's [build-system] requires both) and a C++17 compiler. They are optional: without
a compiler, without either header package (`pip install --no-build-isolation` in an
environment that lacks them), or with SKINMTL_BUILD_KERNELS=0 (a GPU install needs none), the
package installs without them and the models use XLA's convolutions (slower on CPUs, the same
values up to float rounding). `python -c "import skinmtl_jax.kernels as k; print(k.status())"`
says which. The library records the jaxlib it was built against: a different XLA FFI API in
the jaxlib installed later leaves XLA's convolutions too (skinmtl_jax/kernels/ffi.py).
"""

import os
import sys

import setuptools

BUILD_VARIABLE = 'SKINMTL_BUILD_KERNELS'


def _skip(why: str) -> list:
  print(f'skinmtl_jax: not building the CPU kernels ({why}); CPU convolutions will use XLA.',
        file=sys.stderr)
  return []


def _extensions():
  if os.environ.get(BUILD_VARIABLE, '1').strip().lower() in ('0', 'false', 'no', 'off'):
    return _skip(f'{BUILD_VARIABLE}={os.environ[BUILD_VARIABLE]}')
  try:
    import jaxlib  # pylint: disable=g-import-not-at-top
    import scipy_openblas32  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return _skip(f'{e.name} is not importable here: it brings the headers they need')
  includes = [os.path.join(os.path.dirname(jaxlib.__file__), 'include'),
              scipy_openblas32.get_include_dir()]
  return [setuptools.Extension(
      'skinmtl_jax.kernels._conv2d',
      sources=['skinmtl_jax/kernels/conv2d.cc'],
      language='c++',
      define_macros=[('SKINMTL_JAXLIB', f'"{jaxlib.__version__}"')],
      # -isystem: the headers' own warnings are not ours. Nothing is linked: the loader
      # (skinmtl_jax/kernels/ffi.py) hands the kernel scipy-openblas32's sgemm.
      extra_compile_args=['-std=c++17', '-O3'] + [f'-isystem{d}' for d in includes],
      extra_link_args=['-pthread'],
      # A failed compilation (no compiler) is a warning, and the install goes on without it.
      optional=True)]


setuptools.setup(ext_modules=_extensions())
