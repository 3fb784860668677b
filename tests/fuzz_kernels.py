"""Differential fuzzing of the CPU kernels (skinmtl_jax/kernels) against a float64 reference.

    python tests/fuzz_kernels.py [--cases=2000] [--seed=0] [--max_size=24]
    python tests/fuzz_kernels.py --sanitize [--cases=...]   # under ASan + UBSan

Each case draws a convolution: batch 0-3, images 1-24 pixels a side (1-80 in one case of ten,
so that images span several blocks and kernel gradients several chunks), 1-70 channels, 1-40
outputs, kernels 1x1 to 7x7 and strides 1-5 (3x3 at stride 1 in a third of the cases, for
Winograd's), leading and trailing pads from -30 to 30 (wider than the image, or cropping it),
and 1-5 threads (SKINMTL_KERNEL_THREADS). On it, every kernel that applies runs and is
compared with a float64 NumPy reference (written from the definition: no XLA, which is wrong
for some negative pads, openxla/xla#48713): the forward, the input gradient and the kernel
gradient by im2col GEMMs; the 3x3 stride-1 forward and kernel gradient by Winograd; on CPUs
with AMX-BF16 the bfloat16 forward (bfloat16 and float32 results, bfloat16 and float32
kernels) and the stride-1 kernel gradient; and the routed convolution the models use
(`kernels.KernelConvolution`: forward and both gradients through `jax.vjp`). An error counts
against the sum of the products' magnitudes (the same convolution of |x| and |w|), the bound a
float32 dot product's error obeys: at most TOLERANCE[kernel] of it.

--sanitize builds the library with AddressSanitizer and UndefinedBehaviorSanitizer (g++, any
report ends the run), then runs the cases with it (SKINMTL_KERNELS_LIBRARY) and the ASan
runtime preloaded into python. Exit status 0: every case within its tolerance, no report.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import ml_dtypes  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from skinmtl_jax import kernels  # pylint: disable=wrong-import-position
from skinmtl_jax.models import conv  # pylint: disable=wrong-import-position

NHWC = ('NHWC', 'HWIO', 'NHWC')
# The largest error allowed, as a fraction of the sum of the products' magnitudes (for
# Winograd's, the largest such sum in its tile): several times the largest errors measured
# (benchmarks/RESULTS.md, the CPU kernels' section).
TOLERANCE = collections.defaultdict(lambda: 2e-6, winograd=1e-5, winograd_weight_grad=1e-5,
                                    routed=1e-5, routed_bf16=1e-5)
BF16_ULP = 2.0 ** -8  # a bfloat16 rounding, relative


# ---- The float64 reference, from the definition ----

def _taps(kernel_hw, strides, lead, out_hw, in_hw):
  """For each tap (r, s) of the kernel: the input rows and columns its output pixels read,
  i*sh + r - pt and j*sw + s - pl, and which of them lie inside the image."""
  for r in range(kernel_hw[0]):
    for s in range(kernel_hw[1]):
      rows = np.arange(out_hw[0]) * strides[0] + r - lead[0]
      cols = np.arange(out_hw[1]) * strides[1] + s - lead[1]
      yield r, s, rows, (rows >= 0) & (rows < in_hw[0]), cols, (cols >= 0) & (cols < in_hw[1])


def _read(x, rows, rin, cols, cin):
  """x[n, rows[i], cols[j]] (N, Ho, Wo, C), zeros outside the image."""
  out = np.zeros((x.shape[0], len(rows), len(cols), x.shape[3]))
  out[np.ix_(range(x.shape[0]), np.flatnonzero(rin), np.flatnonzero(cin), range(x.shape[3]))] = (
      x[np.ix_(range(x.shape[0]), rows[rin], cols[cin], range(x.shape[3]))])
  return out


def ref_conv(x, w, strides, lead, out_hw):
  y = np.zeros((x.shape[0], *out_hw, w.shape[3]))
  for r, s, *where in _taps(w.shape[:2], strides, lead, out_hw, x.shape[1:3]):
    y += np.einsum('nijc,co->nijo', _read(x, *where), w[r, s])
  return y


def ref_input_grad(g, w, strides, lead, in_hw):
  n, c = g.shape[0], w.shape[2]
  dx = np.zeros((n, *in_hw, c))
  for r, s, rows, rin, cols, cin in _taps(w.shape[:2], strides, lead, g.shape[1:3], in_hw):
    # The output pixels of one tap read distinct inputs: a plain += adds each once.
    part = np.einsum('nijo,co->nijc', g[np.ix_(range(n), np.flatnonzero(rin),
                                               np.flatnonzero(cin), range(g.shape[3]))],
                     w[r, s])
    dx[np.ix_(range(n), rows[rin], cols[cin], range(c))] += part
  return dx


def ref_weight_grad(x, g, strides, lead, kernel_hw):
  dw = np.zeros((*kernel_hw, x.shape[3], g.shape[3]))
  for r, s, *where in _taps(kernel_hw, strides, lead, g.shape[1:3], x.shape[1:3]):
    dw[r, s] = np.einsum('nijc,nijo->co', _read(x, *where), g)
  return dw


# ---- Cases ----

def draw(rng, max_size: int) -> dict:
  """One convolution's geometry (see the module docstring)."""
  big = rng.random() < 0.1
  size = 80 if big else max_size
  while True:
    winograd = rng.random() < 1 / 3
    kh, kw = (3, 3) if winograd else rng.integers(1, 8, 2)
    sh, sw = (1, 1) if winograd or rng.random() < 0.4 else rng.integers(1, 6, 2)
    h, w = rng.integers(1, size + 1, 2)
    pad = lambda: int(rng.integers(-30, 31) if rng.random() < 0.3 else rng.integers(-3, 4))
    pads = ((pad(), pad()), (pad(), pad()))
    ho = (h + sum(pads[0]) - kh) // sh + 1
    wo = (w + sum(pads[1]) - kw) // sw + 1
    if ho >= 1 and wo >= 1 or (ho == 0 and wo >= 0 and rng.random() < 0.1):
      break
  return dict(n=int(rng.choice([0, 1, 2, 3], p=[0.02, 0.38, 0.4, 0.2])), h=int(h), w=int(w),
              c=int(rng.integers(1, 9) if rng.random() < 0.6 else rng.integers(1, 71)),
              o=int(rng.integers(1, 41)), kh=int(kh), kw=int(kw), strides=(int(sh), int(sw)),
              pads=pads, out_hw=(int(ho), int(wo)), threads=int(rng.integers(1, 6)))


def _winograd_scale(scale, part):
  """Winograd's transforms mix the values of a tile: its error at a value counts against the
  largest magnitude of the 2x2 output tile it is in ('forward'), or of the 3x3 taps of its
  channel pair ('kernel'; their sums are transformed together)."""
  if part == 'kernel':
    return np.broadcast_to(scale.max(axis=(0, 1), keepdims=True, initial=0.0), scale.shape)
  n, h, w, o = scale.shape
  padded = np.zeros((n, h + h % 2, w + w % 2, o))
  padded[:, :h, :w] = scale
  tiles = padded.reshape(n, padded.shape[1] // 2, 2, padded.shape[2] // 2, 2, o).max(
      axis=(2, 4), initial=0.0)
  return tiles.repeat(2, axis=1).repeat(2, axis=2)[:, :h, :w]


def _check(stats, failures, case, name, ours, ref, scale, bf16_result=False, winograd=None):
  ours = np.asarray(ours).astype(np.float64)  # bfloat16 too (ml_dtypes)
  assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
  if winograd:
    scale = _winograd_scale(scale, winograd)
  err = np.abs(ours - ref)
  if bf16_result:
    err = np.maximum(err - BF16_ULP * np.abs(ref), 0.0)
  ratio = float(np.max(err / np.maximum(scale, 1e-30), initial=0.0))
  finite = bool(np.all(np.isfinite(ours)))
  stats[name].append(ratio)
  if not finite or ratio > TOLERANCE[name]:
    failures.append(f'{name}: error {ratio:.3g} of the magnitudes (tolerance '
                    f'{TOLERANCE[name]:.1g}), finite {finite}, case {case}')


def _routed(x, k, g, strides, pads, amx):
  """The models' convolution on a CPU (`kernels.KernelConvolution`): its output and, through
  `jax.vjp`, its gradients for the output gradient g."""
  ours = kernels.KernelConvolution(conv.xla_conv_general_dilated, amx=amx)
  y, vjp = jax.vjp(lambda x, k: ours(x, k, strides, pads, dimension_numbers=NHWC), x, k)
  return (y, *vjp(g))


def _kernel_outputs(case: dict, amx: bool):
  """A function of (x, k, g) giving {check: [outputs]} for every kernel that applies to `case`
  (compiled as one program: one compilation per case instead of one per call)."""
  n, h, w, kh, kw = (case[k] for k in ('n', 'h', 'w', 'kh', 'kw'))
  strides, pads, out_hw = case['strides'], case['pads'], case['out_hw']
  lead = (pads[0][0], pads[1][0])

  def outputs(x, k, g):
    out = {'conv2d': [kernels.conv2d(x, k, strides, lead, out_hw)],
           'input_grad': [kernels.conv2d_input_grad(g, k, strides, lead, (h, w))],
           'weight_grad': [kernels.conv2d_weight_grad(x, g, strides, lead, (kh, kw))]}
    if (kh, kw) == (3, 3) and strides == (1, 1):
      out['winograd'] = [kernels.winograd_conv3x3(x, k, lead, out_hw)]
      out['winograd_weight_grad'] = [kernels.winograd_conv3x3_weight_grad(x, g, lead)]
    # bfloat16 operands: the models' mixed precision (the float32 kernels on their values, or
    # AMX)
    xb, kb, gb = (a.astype(jnp.bfloat16) for a in (x, k, g))
    if n > 0 and out_hw[0] * out_hw[1] > 0:  # the routed convolution, as the models call it
      out['routed'] = _routed(x, k, g, strides, pads, False)
      out['routed_bf16'] = _routed(xb, kb, gb, strides, pads, amx)
    if amx:
      out['bf16_f32'] = [kernels.conv2d_bf16(xb, kb, strides, lead, out_hw, jnp.float32)]
      out['bf16'] = [kernels.conv2d_bf16(xb, kb, strides, lead, out_hw)]
      # The float32 kernel, rounded inside as kb was.
      out['bf16_wf32'] = [kernels.conv2d_bf16(xb, k, strides, lead, out_hw)]
      if strides == (1, 1):
        out['bf16_weight_grad'] = [kernels.conv2d_bf16_weight_grad(xb, gb, lead, (kh, kw))]
    return out
  return jax.jit(outputs)


def run_case(case: dict, rng, stats, failures, amx: bool) -> None:
  """Every kernel that applies to `case`, against the reference."""
  os.environ[kernels.ffi.THREADS_VARIABLE] = str(case['threads'])  # read when traced
  n, h, w, c, o, kh, kw = (case[k] for k in ('n', 'h', 'w', 'c', 'o', 'kh', 'kw'))
  strides, pads, out_hw = case['strides'], case['pads'], case['out_hw']
  lead = (pads[0][0], pads[1][0])
  x = rng.standard_normal((n, h, w, c)).astype(np.float32)
  k = rng.standard_normal((kh, kw, c, o)).astype(np.float32)
  g = rng.standard_normal((n, *out_hw, o)).astype(np.float32)
  out = _kernel_outputs(case, amx)(x, k, g)
  check = lambda *a, **kw_: _check(stats, failures, case, *a, **kw_)
  stride1_3x3 = (kh, kw) == (3, 3) and strides == (1, 1)
  # Routed by shape: Winograd's where it applies (the stride-1 input gradient is a forward).
  tiles = lambda part, winograd=stride1_3x3: part if winograd else None

  for values, bf16 in ((tuple(a.astype(np.float64) for a in (x, k, g)), False),
                       (tuple(a.astype(ml_dtypes.bfloat16).astype(np.float64)
                              for a in (x, k, g)), True)):
    xd, kd, gd = values
    y = (ref_conv(xd, kd, strides, lead, out_hw),
         ref_conv(np.abs(xd), np.abs(kd), strides, lead, out_hw))
    dx = (ref_input_grad(gd, kd, strides, lead, (h, w)),
          ref_input_grad(np.abs(gd), np.abs(kd), strides, lead, (h, w)))
    dk = (ref_weight_grad(xd, gd, strides, lead, (kh, kw)),
          ref_weight_grad(np.abs(xd), np.abs(gd), strides, lead, (kh, kw)))
    if not bf16:
      check('conv2d', *out['conv2d'], *y)
      check('input_grad', *out['input_grad'], *dx)
      check('weight_grad', *out['weight_grad'], *dk)
      if stride1_3x3:
        check('winograd', *out['winograd'], *y, winograd='forward')
        check('winograd_weight_grad', *out['winograd_weight_grad'], *dk, winograd='kernel')
      if 'routed' in out:
        for value, ref, part in zip(out['routed'], (y, dx, dk), ('forward',) * 2 + ('kernel',)):
          check('routed', value, *ref, winograd=tiles(part))
    else:
      if 'routed_bf16' in out:
        for value, ref, part in zip(out['routed_bf16'], (y, dx, dk),
                                    ('forward',) * 2 + ('kernel',)):
          check('routed_bf16', value, *ref, bf16_result=True,
                winograd=tiles(part, stride1_3x3 and not amx))
      if amx:
        check('bf16_f32', *out['bf16_f32'], *y)
        check('bf16', *out['bf16'], *y, bf16_result=True)
        check('bf16_wf32', *out['bf16_wf32'], *y, bf16_result=True)
        if strides == (1, 1):
          check('bf16_weight_grad', *out['bf16_weight_grad'], *dk)


def fuzz(cases: int, seed: int = 0, max_size: int = 24, log=print) -> tuple[dict, list]:
  """Runs `cases` random cases. Returns ({kernel: [error ratio per check]}, [failures])."""
  if not kernels.available():
    raise SystemExit(f'The CPU kernels are not available: {kernels.status()}')
  amx = kernels.amx_available()
  log(f'{cases} cases, seed {seed}; AMX-BF16 kernels: '
      f'{"fuzzed" if amx else "not run (this CPU has no AMX-BF16)"}')
  rng = np.random.default_rng(seed)
  stats, failures = collections.defaultdict(list), []
  saved = os.environ.get(kernels.ffi.THREADS_VARIABLE)
  try:
    for i in range(cases):
      run_case(draw(rng, max_size), rng, stats, failures, amx)
      if (i + 1) % 200 == 0:
        log(f'{i + 1} cases, {len(failures)} failures')
  finally:
    if saved is None:
      os.environ.pop(kernels.ffi.THREADS_VARIABLE, None)
    else:
      os.environ[kernels.ffi.THREADS_VARIABLE] = saved
  return stats, failures


def _sanitized_library(workdir: str) -> str:
  """conv2d.cc built as setup.py builds it, with ASan and UBSan (any UBSan report aborts)."""
  import jaxlib  # pylint: disable=import-outside-toplevel
  import scipy_openblas32  # pylint: disable=import-outside-toplevel
  out = os.path.join(workdir, '_conv2d_asan.so')
  subprocess.run(['g++', '-std=c++17', '-O1', '-g', '-fPIC', '-shared', '-pthread',
                  '-fsanitize=address,undefined', '-fno-sanitize-recover=all',
                  '-fno-omit-frame-pointer', f'-DSKINMTL_JAXLIB="{jaxlib.__version__}"',
                  f'-isystem{pathlib.Path(jaxlib.__file__).parent / "include"}',
                  f'-isystem{scipy_openblas32.get_include_dir()}',
                  str(ROOT / 'skinmtl_jax/kernels/conv2d.cc'), '-o', out], check=True)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--cases', type=int, default=2000)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--max_size', type=int, default=24)
  parser.add_argument('--sanitize', action='store_true',
                      help='build with ASan + UBSan and run under them')
  args = parser.parse_args()
  if args.sanitize:
    with tempfile.TemporaryDirectory() as workdir:
      library = _sanitized_library(workdir)
      # The ASan runtime first, libstdc++ with it: ASan intercepts __cxa_throw, which jaxlib
      # calls (and catches) while it starts, and finds nothing to forward to otherwise.
      preload = ' '.join(subprocess.run(['g++', f'-print-file-name={name}'], check=True,
                                        capture_output=True, text=True).stdout.strip()
                         for name in ('libasan.so', 'libstdc++.so'))
      env = dict(os.environ, LD_PRELOAD=preload, SKINMTL_KERNELS_LIBRARY=library,
                 ASAN_OPTIONS='detect_leaks=0:abort_on_error=1',
                 UBSAN_OPTIONS='print_stacktrace=1:halt_on_error=1')
      print(f'Built {library} with -fsanitize=address,undefined; running under it.', flush=True)
      sys.exit(subprocess.run([sys.executable, __file__, f'--cases={args.cases}',
                               f'--seed={args.seed}', f'--max_size={args.max_size}'],
                              env=env, check=False).returncode)
  print(f'library: {os.environ.get("SKINMTL_KERNELS_LIBRARY") or "the installed build"}, '
        f'status {kernels.status()}', flush=True)
  stats, failures = fuzz(args.cases, args.seed, args.max_size,
                         log=lambda s: print(s, flush=True))
  print('| kernel | checks | largest error / magnitudes | tolerance |')
  print('| --- | --- | --- | --- |')
  for name in sorted(stats):
    print(f'| {name} | {len(stats[name])} | {max(stats[name]):.2g} | {TOLERANCE[name]:.0e} |')
  for f in failures[:20]:
    print('FAIL', f)
  print(f'{len(failures)} failures in {sum(map(len, stats.values()))} checks')
  sys.exit(1 if failures else 0)


if __name__ == '__main__':
  main()
