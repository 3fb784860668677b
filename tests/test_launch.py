"""launch/sweep.py (grid expansion, local, slurm and print modes) and launch/slurm.sbatch (run
under bash with fake srun, python, scontrol and sbatch executables). Fast: nothing trains."""

import importlib.util
import json
import os
import pathlib
import signal
import stat
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SBATCH_SCRIPT = ROOT / 'launch' / 'slurm.sbatch'

_spec = importlib.util.spec_from_file_location('launch_sweep', ROOT / 'launch' / 'sweep.py')
sweep = importlib.util.module_from_spec(_spec)
sys.modules['launch_sweep'] = sweep
_spec.loader.exec_module(sweep)


GRID = dict(
    configs=['configs/mtl2.py', 'configs/mtl3.py'],
    seeds=[0, 1, 2],
    sets=[('model.reverse_stop_gradient', ['False', 'True']), ('loss.dice_weight', ['0.5', '0.7'])],
    root='runs/sweep',
    extra=['--config.data.manual_dir=/data'],
)


def _small_grid(root='runs/s'):
  return sweep.expand(['configs/mtl2.py'], [0, 1],
                      [('model.reverse_stop_gradient', ['False', 'True'])], root,
                      ['--config.data.manual_dir=/data', '--config.num_epochs=1'])


def _write_exe(path: pathlib.Path, text: str) -> pathlib.Path:
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
  return path


def _read_argv(path: pathlib.Path) -> list[str]:
  """Arguments recorded NUL-terminated by `printf '%s\\0' "$@"`."""
  return path.read_bytes().decode().split('\0')[:-1]


# --- (a) the expansion -----------------------------------------------------------------------


def test_expand_counts_unique_deterministic():
  runs = sweep.expand(**GRID)
  assert len(runs) == 2 * 3 * 2 * 2
  names = [r.name for r in runs]
  assert len(set(names)) == len(names)
  assert len({r.workdir for r in runs}) == len(runs)
  assert runs == sweep.expand(**GRID)
  assert names[0] == 'mtl2/seed0/reverse_stop_gradient=False,dice_weight=0.5'
  assert names[-1] == 'mtl3/seed2/reverse_stop_gradient=True,dice_weight=0.7'
  for r in runs:
    assert r.workdir == os.path.join('runs/sweep', *r.name.split('/'))
    assert r.args[-1] == '--config.data.manual_dir=/data'


def test_expand_exact_arguments():
  runs = _small_grid()
  extra = ['--config.data.manual_dir=/data', '--config.num_epochs=1']
  expected = []
  for seed in (0, 1):
    for value in ('False', 'True'):
      workdir = f'runs/s/mtl2/seed{seed}/reverse_stop_gradient={value}'
      expected.append((f'mtl2/seed{seed}/reverse_stop_gradient={value}', workdir,
                       ['--config=configs/mtl2.py', f'--workdir={workdir}', f'--config.seed={seed}',
                        f'--config.model.reverse_stop_gradient={value}', *extra]))
  assert [(r.name, r.workdir, list(r.args)) for r in runs] == expected
  assert runs[0].command('py') == ['py', '-m', 'skinmtl_jax.main', *expected[0][2]]


def test_expand_without_overrides():
  runs = sweep.expand(['configs/unet.py'], [3], [], 'r')
  assert [(r.name, list(r.args)) for r in runs] == [
      ('unet/seed3', ['--config=configs/unet.py', '--workdir=r/unet/seed3', '--config.seed=3'])]


def test_a_config_size_names_the_run():
  runs = sweep.expand(['configs/unet.py:cpu', 'configs/unet.py'], [0], [], 'r')
  assert [(r.name, r.args[0]) for r in runs] == [('unet-cpu/seed0', '--config=configs/unet.py:cpu'),
                                                 ('unet/seed0', '--config=configs/unet.py')]


def test_special_characters():
  values = ['/a b/c', "it's", '(192,256)', '', '..', 'a_b', 'a b', 'x' * 300, 'ü']
  runs = sweep.expand(['configs/mtl2.py'], [0], [('data.manual_dir', values)], 'root')
  names = [r.name for r in runs]
  assert len(set(names)) == len(values)
  assert names == [r.name for r in sweep.expand(['configs/mtl2.py'], [0],
                                                [('data.manual_dir', values)], 'root')]
  for r, value in zip(runs, values):
    last = r.name.split('/')[-1]
    assert last.startswith('manual_dir=')
    assert last not in ('.', '..') and len(last) <= 255
    assert all(c.isascii() and (c.isalnum() or c in '._+-=,') for c in last), last
    assert r.args[3] == f'--config.data.manual_dir={value}'  # the value itself is untouched
  assert names[5] == 'mtl2/seed0/manual_dir=a_b'  # unchanged values get no hash


def test_split_and_parse():
  assert sweep.split_values('False,True') == ['False', 'True']
  assert sweep.split_values('(192,256),(96,128)') == ['(192,256)', '(96,128)']
  assert sweep.split_values('"a,b",[1,2],{x,y}') == ['"a,b"', '[1,2]', '{x,y}']
  assert sweep.parse_set('config.loss.dice_weight=0.5,0.7') == ('loss.dice_weight', ['0.5', '0.7'])
  assert sweep.parse_set('data.manual_dir=/x=y') == ('data.manual_dir', ['/x=y'])
  assert sweep.parse_seeds('0-2,7') == [0, 1, 2, 7]
  for bad in ('nofield', 'bad key=1', 'seed=1,2'):
    with pytest.raises(ValueError):
      sweep.parse_set(bad)
  with pytest.raises(ValueError):
    sweep.parse_seeds('a')


def test_same_leaf_names_are_disambiguated():
  sets = [('model.x', ['1']), ('loss.x', ['2']), ('y', ['3'])]
  runs = sweep.expand(['configs/mtl2.py'], [0], sets, 'r')
  assert runs[0].name == 'mtl2/seed0/model.x=1,loss.x=2,y=3'


@pytest.mark.parametrize('kwargs', [
    dict(sets=[('a.b', ['1']), ('a.b', ['2'])]),
    dict(sets=[('a.b', ['1', '1'])]),
    dict(sets=[('a.b', [])]),
    dict(extra=['--workdir=elsewhere']),
    dict(extra=['--config.seed=4']),
    dict(extra=['--config.a.b=3'], sets=[('a.b', ['1'])]),
    dict(configs=['configs/mtl2.py', 'other/mtl2.py']),
    dict(seeds=[]),
])
def test_expand_rejects(kwargs):
  args = dict(configs=['configs/mtl2.py'], seeds=[0], sets=[], root='r', extra=[])
  args.update(kwargs)
  with pytest.raises(ValueError):
    sweep.expand(**args)


# --- (b), (c) the SLURM script ---------------------------------------------------------------


def test_sbatch_script_parses():
  subprocess.run(['bash', '-n', str(SBATCH_SCRIPT)], check=True)


@pytest.fixture
def fake_cluster(tmp_path):
  """A folder of fake srun / python / scontrol that record their arguments into tmp_path/log."""
  bin_dir, log = tmp_path / 'bin', tmp_path / 'log'
  bin_dir.mkdir()
  log.mkdir()
  _write_exe(bin_dir / 'srun', f"""#!/usr/bin/env bash
printf '%s\\0' "$@" > {log}/srun.argv
echo "${{SRUN_CPUS_PER_TASK:-}}" > {log}/srun.cpus
if [[ -n "${{FAKE_TERM_PARENT:-}}" ]]; then kill -TERM "$PPID"; sleep 0.2; fi
exec "$@"
""")
  for name in ('python', 'mypython'):
    _write_exe(bin_dir / name, f"""#!/usr/bin/env bash
printf '%s\\0' "$@" > {log}/{name}.argv
pwd > {log}/{name}.cwd
exit "${{FAKE_EXIT:-0}}"
""")
  _write_exe(bin_dir / 'scontrol', f"""#!/usr/bin/env bash
printf '%s\\0' "$@" > {log}/scontrol.argv
""")
  submit = tmp_path / 'submit'
  submit.mkdir()
  env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'SRUN_'))}
  env.pop('PYTHON', None)
  env.update(PATH=f'{bin_dir}{os.pathsep}{env["PATH"]}', SLURM_SUBMIT_DIR=str(submit),
             SLURM_JOB_ID='4242', SLURM_CPUS_PER_TASK='6')
  return env, log, submit


def _run_script(env, args, **extra_env):
  return subprocess.run(['bash', str(SBATCH_SCRIPT), *args], env={**env, **extra_env},
                        cwd='/', capture_output=True, text=True, timeout=30, check=False)


def test_sbatch_runs_main_with_the_sweeps_arguments(fake_cluster):
  env, log, submit = fake_cluster
  run = _small_grid()[3]
  result = _run_script(env, run.args)
  assert result.returncode == 0, result.stderr
  assert _read_argv(log / 'python.argv') == ['-m', 'skinmtl_jax.main', *run.args]
  assert _read_argv(log / 'srun.argv') == ['python', '-m', 'skinmtl_jax.main', *run.args]
  assert (log / 'python.cwd').read_text().strip() == str(submit)
  assert (log / 'srun.cpus').read_text().strip() == '6'
  assert not (log / 'scontrol.argv').exists()


def test_sbatch_python_from_env(fake_cluster):
  env, log, _ = fake_cluster
  result = _run_script(env, ['--config=c.py', '--workdir=w w'], PYTHON='mypython')
  assert result.returncode == 0, result.stderr
  assert _read_argv(log / 'mypython.argv') == ['-m', 'skinmtl_jax.main', '--config=c.py',
                                              '--workdir=w w']
  assert not (log / 'python.argv').exists()


def test_sbatch_requeues_on_exit_75(fake_cluster):
  env, log, _ = fake_cluster
  result = _run_script(env, ['--config=c.py', '--workdir=w'], FAKE_EXIT='75')
  assert result.returncode == 75
  assert _read_argv(log / 'scontrol.argv') == ['requeue', '4242']


def test_sbatch_requeues_after_sigterm_to_the_batch_shell(fake_cluster):
  # Preemption signals every process of the job, the batch shell too: it must outlive srun.
  env, log, _ = fake_cluster
  result = _run_script(env, ['--config=c.py', '--workdir=w'], FAKE_EXIT='75', FAKE_TERM_PARENT='1')
  assert result.returncode == 75, result.stderr
  assert 'SIGTERM received' in result.stderr
  assert _read_argv(log / 'scontrol.argv') == ['requeue', '4242']


@pytest.mark.parametrize('code, job_id', [(1, '4242'), (75, None)])
def test_sbatch_no_requeue(fake_cluster, code, job_id):
  env, log, _ = fake_cluster
  if job_id is None:
    del env['SLURM_JOB_ID']
  result = _run_script(env, ['--config=c.py', '--workdir=w'], FAKE_EXIT=str(code))
  assert result.returncode == code
  assert not (log / 'scontrol.argv').exists()


# --- (d) slurm mode --------------------------------------------------------------------------


def test_slurm_mode_submits_each_run(tmp_path, monkeypatch, fake_cluster):
  env, log, submit = fake_cluster
  calls = tmp_path / 'sbatch_calls'
  calls.mkdir()
  fake_sbatch = _write_exe(tmp_path / 'fake_sbatch', f"""#!/usr/bin/env bash
n=$(ls {calls} | grep -c '^argv' || true)
printf '%s\\0' "$@" > {calls}/argv.$n
echo "${{PYTHON:-unset}}" > {calls}/python.$n
echo "$((1000 + n));cluster"
""")
  monkeypatch.chdir(ROOT)
  root = str(tmp_path / 'sweep')
  runs = _small_grid(root)
  os.makedirs(runs[1].workdir)
  pathlib.Path(runs[1].workdir, 'metrics.json').write_text('{}')
  code = sweep.main(['--configs=configs/mtl2.py', '--seeds=0,1',
                     '--set=model.reverse_stop_gradient=False,True', f'--root={root}',
                     '--mode=slurm', f'--sbatch={fake_sbatch}',
                     '--sbatch_args=--partition=gpu -t 1:00:00',
                     '--python=/opt/venv/bin/python', '--', '--config.data.manual_dir=/data',
                     '--config.num_epochs=1'])
  assert code == 0
  submitted = [r for i, r in enumerate(runs) if i != 1]
  for n, run in enumerate(submitted):
    assert _read_argv(calls / f'argv.{n}') == [
        '--parsable', f'--job-name=skinmtl-{run.name.replace("/", "-")}',
        f'--output={run.workdir}/slurm-%j.out', '--partition=gpu', '-t', '1:00:00',
        str(SBATCH_SCRIPT), *run.args]
    assert (calls / f'python.{n}').read_text().strip() == '/opt/venv/bin/python'
    assert os.path.isdir(run.workdir)  # SLURM's log goes there
  assert not (calls / 'argv.3').exists()
  manifest = json.loads(pathlib.Path(root, 'sweep.json').read_text())
  assert [r['name'] for r in manifest['runs']] == [r.name for r in runs]
  assert [r['args'] for r in manifest['runs']] == [list(r.args) for r in runs]
  assert [r.get('job_id') for r in manifest['runs']] == ['1000', None, '1001', '1002']
  assert manifest['runs'][1]['status'] == 'skipped'

  # What sbatch was given after the script is what the script hands to main through srun.
  args = _read_argv(calls / 'argv.2')
  args = args[args.index(str(SBATCH_SCRIPT)) + 1:]
  result = _run_script(env, args)
  assert result.returncode == 0, result.stderr
  assert _read_argv(log / 'python.argv') == ['-m', 'skinmtl_jax.main', *submitted[2].args]


def test_dry_run_and_print_mode(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(ROOT)
  root = tmp_path / 'sweep'
  argv = ['--configs=mtl2', '--seeds=0,1', f'--root={root}', '--python=py']
  assert sweep.main([*argv, '--mode=slurm', '--sbatch=/nonexistent/sbatch', '--dry_run']) == 0
  assert not root.exists()
  capsys.readouterr()
  assert sweep.main([*argv, '--mode=print', '--', "--config.data.manual_dir=/my data"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines == [
      f"py -m skinmtl_jax.main --config=configs/mtl2.py --workdir={root}/mtl2/seed{s} "
      f"--config.seed={s} '--config.data.manual_dir=/my data'" for s in (0, 1)]
  assert len(json.loads((root / 'sweep.json').read_text())['runs']) == 2
  assert sweep.main([*argv, '--configs=missing']) == 2
  capsys.readouterr()
  assert sweep.main([*argv, '--configs=mtl2:cpu,configs/unet.py:cpu', '--mode=print']) == 0
  assert [line.split()[3:5] for line in capsys.readouterr().out.splitlines()] == [
      ['--config=configs/mtl2.py:cpu', f'--workdir={root}/mtl2-cpu/seed0'],
      ['--config=configs/mtl2.py:cpu', f'--workdir={root}/mtl2-cpu/seed1'],
      ['--config=configs/unet.py:cpu', f'--workdir={root}/unet-cpu/seed0'],
      ['--config=configs/unet.py:cpu', f'--workdir={root}/unet-cpu/seed1']]


# --- (e) local mode --------------------------------------------------------------------------


@pytest.fixture
def fake_main(tmp_path):
  """A fake interpreter: logs its argv, exits $FAKE_EXIT if $FAKE_FAIL is in the workdir, else
  writes metrics.json (a finished run)."""
  log = tmp_path / 'calls.jsonl'
  exe = _write_exe(tmp_path / 'fakepython', f"""#!{sys.executable}
import json, os, sys
with open({str(log)!r}, 'a') as f:
  f.write(json.dumps(sys.argv[1:]) + '\\n')
workdir = [a for a in sys.argv if a.startswith('--workdir=')][0].split('=', 1)[1]
if os.environ.get('FAKE_FAIL') and os.environ['FAKE_FAIL'] in workdir:
  sys.exit(int(os.environ.get('FAKE_EXIT', '3')))
os.makedirs(workdir, exist_ok=True)
open(os.path.join(workdir, 'metrics.json'), 'w').write('{{}}')
""")
  def calls():
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
  return exe, calls


def _local(root, exe, *more):
  return sweep.main(['--configs=configs/mtl2.py', '--seeds=0,1',
                     '--set=model.reverse_stop_gradient=False,True', f'--root={root}',
                     '--mode=local', f'--python={exe}', *more, '--',
                     '--config.data.manual_dir=/data', '--config.num_epochs=1'])


def test_local_mode_runs_each_once_and_skips_finished(tmp_path, monkeypatch, fake_main):
  exe, calls = fake_main
  monkeypatch.chdir(ROOT)
  root = str(tmp_path / 'sweep')
  runs = _small_grid(root)
  os.makedirs(runs[2].workdir)
  pathlib.Path(runs[2].workdir, 'metrics.json').write_text('{}')
  assert _local(root, exe) == 0
  expected = [['-m', 'skinmtl_jax.main', *r.args] for i, r in enumerate(runs) if i != 2]
  assert calls() == expected
  manifest = json.loads(pathlib.Path(root, 'sweep.json').read_text())
  assert [r['status'] for r in manifest['runs']] == ['succeeded', 'succeeded', 'skipped',
                                                     'succeeded']
  assert _local(root, exe) == 0  # everything finished: nothing runs again
  assert len(calls()) == 3
  assert _local(root, exe, '--force') == 0
  assert len(calls()) == 7


def test_local_mode_stops_at_a_failure(tmp_path, monkeypatch, fake_main, capsys):
  exe, calls = fake_main
  monkeypatch.chdir(ROOT)
  monkeypatch.setenv('FAKE_FAIL', 'seed0/reverse_stop_gradient=True')
  root = str(tmp_path / 'sweep')
  assert _local(root, exe) == 1
  assert len(calls()) == 2
  err, out = capsys.readouterr()[::-1]
  assert 'mtl2/seed0/reverse_stop_gradient=True FAILED with exit status 3' in err
  assert '1 failed, 2 not run, 1 succeeded' in out
  manifest = json.loads(pathlib.Path(root, 'sweep.json').read_text())
  assert [r['status'] for r in manifest['runs']] == ['succeeded', 'failed', 'not run', 'not run']

  assert _local(root, exe, '--keep_going') == 1  # the first is finished; the rest run
  assert len(calls()) == 5
  assert '1 failed, 1 skipped, 2 succeeded' in capsys.readouterr().out


def test_local_mode_stops_when_a_run_is_preempted(tmp_path, monkeypatch, fake_main, capsys):
  exe, calls = fake_main
  monkeypatch.chdir(ROOT)
  monkeypatch.setenv('FAKE_FAIL', 'seed0')
  monkeypatch.setenv('FAKE_EXIT', '75')
  assert _local(str(tmp_path / 'sweep'), exe) == 75
  assert len(calls()) == 1
  assert 'rerun the same sweep command' in capsys.readouterr().err


def test_local_mode_forwards_sigterm(tmp_path, monkeypatch):
  """SIGTERM to the sweep reaches the running child and no further run starts."""
  log = tmp_path / 'log'
  exe = _write_exe(tmp_path / 'slowpython', f"""#!/usr/bin/env bash
echo start >> {log}
trap 'echo term >> {log}; exit 75' TERM
kill -TERM "$PPID"
for i in $(seq 100); do sleep 0.1; done
exit 0
""")
  monkeypatch.chdir(ROOT)
  previous = signal.getsignal(signal.SIGTERM)
  assert _local(str(tmp_path / 'sweep'), exe) == 75
  assert log.read_text().split() == ['start', 'term']
  assert signal.getsignal(signal.SIGTERM) == previous


def test_ladder_trains_every_rung_in_order_then_writes_both_tables(tmp_path):
  """launch/ladder.sh with a fake `python` that writes each run's metrics.json: every config
  of Table 3 runs with the extra arguments, then the real skinmtl_jax.tables writes both
  tables with every rung beside the paper."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  log = tmp_path / 'calls'
  _write_exe(bin_dir / 'python', f'''#!{sys.executable}
import json, os, subprocess, sys
if sys.argv[1:3] == ['-m', 'skinmtl_jax.tables']:
  sys.exit(subprocess.call([{sys.executable!r}] + sys.argv[1:]))
with open({str(log)!r}, 'a') as f:
  f.write(json.dumps(sys.argv[1:]) + '\\n')
workdir = next(a.split('=', 1)[1] for a in sys.argv if a.startswith('--workdir='))
os.makedirs(workdir, exist_ok=True)
row = {{'confusion': [[200, 42], [30, 33]], 'tpr_weighted': 0.76, 'tnr': 0.83, 'dice': 0.85,
        'f1_weighted': 0.77, 'mcc': 0.8, 'iou': 0.75, 'auc': 0.8}}
json.dump({{'params': 10_000_000, 'isic2016_test': row, 'ph2': row}},
          open(os.path.join(workdir, 'metrics.json'), 'w'))
''')
  runs = tmp_path / 'runs'
  r = subprocess.run(['bash', str(ROOT / 'launch' / 'ladder.sh'), str(runs),
                      '--config.data.manual_dir=/data'], cwd=tmp_path, capture_output=True,
                     text=True, timeout=300,
                     env={**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}',
                          'PYTHONPATH': str(ROOT)})
  assert r.returncode == 0, r.stderr[-3000:]
  calls = [json.loads(l) for l in log.read_text().splitlines()]
  names = ['resnet50', 'unet', 'mtl0', 'mtl1', 'mtl2', 'mtl3', 'mtl4']   # tables.LADDER
  assert [c[2] for c in calls] == [f'--config=configs/{n}.py' for n in names]
  assert all(c[-1] == '--config.data.manual_dir=/data' for c in calls)
  for table in ('table3_isic2016.md', 'table4_ph2.md'):
    text = (runs / table).read_text()
    for n in names:
      assert f'| {n} | ours | 10.00 | [[200, 42], [30, 33]] | 76.00 | 83.00 |' in text, (table, n)
  text = (runs / 'table3_isic2016.md').read_text()
  assert all(f'| {n} | paper |' in text for n in names)   # Table 3 has every rung
