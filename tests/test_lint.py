"""The code passes the project's linter (ruff, with the rule set of pyproject.toml's
[tool.ruff.lint]): no unused or undefined names, no syntax error, none of bugbear's likely bugs."""

import subprocess
import sys

from conftest import ROOT


def test_ruff_finds_nothing():
  r = subprocess.run([sys.executable, '-m', 'ruff', 'check', '--no-cache', 'skinmtl_jax', 'tests',
                      'benchmarks', 'launch', 'configs', 'setup.py'],
                     cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert r.returncode == 0, r.stdout + r.stderr
