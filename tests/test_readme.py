"""The README's commands run as written: every `python -m skinmtl_jax...` command's module exists
and takes its flags, every config command builds a valid config, the sweep prints its runs, and
the short ones run (the smoke run, the sweep in print mode)."""

import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

README = (ROOT / 'README.md').read_text(encoding='utf-8')
QUICK_START = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && python -m "
    "skinmtl_jax.main --config=configs/demo.py --workdir=runs/demo",
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && python -m "
    "pytest -q",
)


def _commands() -> list[list[str]]:
  """Every command of the README's bash blocks, split at `&&`, as argv lists."""
  out = []
  for block in re.findall(r'```bash\n(.*?)```', README, flags=re.S):
    for line in block.splitlines():
      line = line.split(' #', 1)[0].strip()
      if not line or line.startswith('#'):
        continue
      for part in line.split('&&'):
        out.append(shlex.split(part.strip()))
  return out


def _skinmtl(module: str) -> list[list[str]]:
  return [c[2:] for c in _commands() if c[:3] == ['python', '-m', f'skinmtl_jax.{module}']]


def test_the_quick_start_has_the_two_commands_a_newcomer_runs():
  for command in QUICK_START:
    assert command in README
  ci = (ROOT / '.ci' / 'run').read_text(encoding='utf-8')
  assert "pip install -q -e '.[test]' && python -m pytest -q" in ci   # CI runs the same tests


def test_every_training_command_builds_a_valid_config():
  from absl import flags
  from ml_collections import config_flags
  from skinmtl_jax import config_base
  commands = _skinmtl('main')
  assert len(commands) >= 6
  for argv in commands:
    values = flags.FlagValues()
    full = ['main', *argv[1:]]   # config_flags reads its overrides from sys_argv
    config_flags.DEFINE_config_file('config', None, flag_values=values, lock_config=True,
                                    sys_argv=full)
    flags.DEFINE_string('workdir', None, '', flag_values=values)
    values(full)
    config_base.validate_config(values.config)
    assert values.workdir, argv


@pytest.mark.parametrize('module', ['evaluate', 'predict', 'grad_study', 'prepare'])
def test_every_other_command_names_flags_its_module_has(module):
  commands = _skinmtl(module) + [c[2:] for c in _commands()
                                 if c[:1] == ['python'] and f'skinmtl_jax.{module}' in c]
  if module != 'prepare':
    assert commands, f'the README shows no {module} command'
  r = subprocess.run([sys.executable, '-m', f'skinmtl_jax.{module}', '--helpfull'], cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  defined = set(re.findall(r'--(?:\[no\])?(\w+)', r.stdout + r.stderr))
  for argv in commands:
    for arg in argv[1:]:
      if arg.startswith('--'):
        assert arg[2:].split('=')[0] in defined, (module, arg)


def test_the_launch_commands_exist_and_the_sweep_prints_its_runs():
  launch = [c for c in _commands() if any(a.startswith('launch/') for a in c)]
  assert launch
  for argv in launch:
    script = next(a for a in argv if a.startswith('launch/'))
    assert (ROOT / script).exists(), script
  sweep = next(c for c in launch if 'launch/sweep.py' in c)
  r = subprocess.run([sys.executable, *sweep[1:]], cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert len(r.stdout.strip().splitlines()) == 6            # 2 configs x 3 seeds


def test_the_smoke_run_runs(tmp_path):
  (smoke,) = [c for c in _skinmtl('main') if '--config=configs/tiny.py' in c]
  argv = [a if not a.startswith('--workdir=') else f'--workdir={tmp_path / "tiny"}' for a in smoke]
  r = subprocess.run([sys.executable, '-m', 'skinmtl_jax.main', *argv[1:]], cwd=ROOT,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (tmp_path / 'tiny' / 'metrics.json').exists()


def test_the_readme_is_a_manual_not_a_notebook():
  lines = README.splitlines()
  assert len(lines) <= 250
  assert '**Contents:**' in README
  for heading in ('Train a paper config on a CPU', 'Train at full size on a GPU',
                  'Evaluate a run', 'Predict on new images', 'Train a seed ensemble',
                  'Study the task gradients', 'Run the ladder, a sweep or a SLURM job'):
    assert f'### {heading}' in README
  for link in re.findall(r'\]\(((?:docs|benchmarks)/[^)#]+)', README):
    assert (ROOT / link).exists(), link
