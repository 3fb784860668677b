"""The GPU check's tooling (benchmarks/device_check.sh, benchmarks/throughput.py) on a CPU:
row specs, the analytic FLOP count, the cards' peaks, the budget rule, and that a failing row
leaves the others and the files. The whole check's dry run is in benchmarks/README.md."""

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import ROOT
from helpers import cpu_env

sys.path.insert(0, str(ROOT / 'benchmarks'))
import throughput  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_row_specs():
  s = throughput.parse_spec('mtl4/bfloat16/8/resident/unroll')
  assert (s.kind, s.model, s.dtype, s.k, s.mode, s.variant) == (
      'jax', 'mtl4', 'bfloat16', 8, 'resident', 'unroll')
  assert throughput.parse_spec('unet/float32/1/constant').variant == ''
  assert throughput.parse_spec('dynunet').kind == 'dynunet'
  for bad in ('mtl4/bfloat16/8', 'mtl4/float16/1/constant', 'mtl4/bfloat16/1/resident/fast'):
    with pytest.raises(ValueError):
      throughput.parse_spec(bad)


def test_analytic_flops_count_convolutions_and_matmuls():
  x = jnp.zeros((2, 12, 16, 3))
  k = jnp.zeros((3, 3, 3, 8))
  w = jnp.zeros((8, 5))

  def f(x, k, w):
    y = jax.lax.conv_general_dilated(x, k, (2, 2), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jax.jit(lambda y: y.mean((1, 2)) @ w)(y)   # a matmul inside a sub-jaxpr
  flops, count = throughput.jaxpr_flops(jax.make_jaxpr(f)(x, k, w).jaxpr)
  conv = 2 * (2 * 6 * 8 * 8) * (3 * 3 * 3)   # 2 x outputs x (kernel taps x input channels)
  assert (flops, count) == (conv + 2 * (2 * 5) * 8, 2)


def test_peaks_by_the_cards_name():
  assert throughput.peaks_for('NVIDIA H100 80GB HBM3')['bfloat16'] == 989.4   # SXM
  assert throughput.peaks_for('NVIDIA H200') == throughput.peaks_for('NVIDIA H100 80GB HBM3')
  assert throughput.peaks_for('NVIDIA H100 PCIe')['tf32'] == 378.0
  assert throughput.peaks_for('NVIDIA H200 NVL')['bfloat16'] == 835.5
  assert throughput.peaks_for('cpu') == {}


def test_estimate_from_comparable_rows():
  done = [{'spec': 'mtl4/bfloat16/1/resident', 'kind': 'jax', 'status': 'ok', 'wall_s': 40.0,
           'latency_s': 10.0, 'members': 1, 'member_loop': 'auto'},
          {'spec': 'mtl4/bfloat16/8/resident/vmap', 'kind': 'jax', 'status': 'ok',
           'wall_s': 50.0, 'members': 8, 'member_loop': 'vmap'},
          {'spec': 'dynunet', 'kind': 'dynunet', 'status': 'failed', 'wall_s': 2.0}]
  est = lambda text, rows=done: throughput.estimate(throughput.parse_spec(text), rows)
  assert est('unet/bfloat16/1/constant') == 30.0   # the last K = 1 row less its latencies
  assert est('mtl4/bfloat16/8/resident/unroll') == 120.0   # 8/2 x the one-member row
  assert est('mtl4/float32/8/resident/vmap') == 50.0
  assert est('mtl4/bfloat16/4/resident/vmap') == 50.0     # the last training row
  assert est('dynunet') == 2.0 and est('matmul') == 10.0
  assert est('dynunet', done[:2]) == 50.0    # none yet: the last row's
  assert est('mtl4/bfloat16/1/resident', []) == 0.0
  # A row an earlier call started with 100 s left and did not finish: at least 125 s.
  assert throughput.estimate(throughput.parse_spec('mtl4/bfloat16/8/resident/unroll'), done,
                             {'mtl4/bfloat16/8/resident/unroll': 100.0}) == 125.0


def _run(tmp_path, *args):
  out = tmp_path / 't.json'
  r = subprocess.run([sys.executable, 'benchmarks/throughput.py', '--matmul_n=64',
                      f'--json={out}', f'--md={tmp_path / "t.md"}', *args], cwd=ROOT,
                     env=cpu_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(out.read_text()), (tmp_path / 't.md').read_text()


def test_a_failing_row_leaves_the_others_and_the_files(tmp_path):
  doc, md = _run(tmp_path, '--rows=matmul,dynunet,matmul', '--fail_row=dynunet')
  assert [r['status'] for r in doc['rows']] == ['ok', 'failed', 'ok'] and doc['complete']
  assert doc['rows'][1]['error'] == 'RuntimeError: deliberate failure of dynunet (--fail_row)'
  assert 'failed: RuntimeError: deliberate failure of dynunet' in md
  assert all(math.isfinite(r['matmul_bf16_tflops']) for r in doc['rows'][::2])


def test_rows_past_the_budget_are_skipped_and_listed(tmp_path):
  doc, md = _run(tmp_path, '--rows=matmul,mtl4/bfloat16/1/constant', '--time_budget_s=0.01')
  assert [r['status'] for r in doc['rows']] == ['skipped', 'skipped']
  assert doc['skipped'] == ['matmul', 'mtl4/bfloat16/1/constant']
  assert 'would pass the budget' in md


def test_device_check_script_parses():
  for script in ('device_check.sh', 'pack_device_check.sh'):
    r = subprocess.run(['bash', '-n', str(ROOT / 'benchmarks' / script)], capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0, r.stderr
  r = subprocess.run(['bash', str(ROOT / 'benchmarks' / 'device_check.sh'), 'bogus'],
                     capture_output=True, text=True, check=False)
  assert r.returncode == 2 and 'usage' in r.stderr
