"""Runs a grid of trainings: configs x seeds x config overrides. From the repository root:

  python launch/sweep.py --configs=configs/mtl2.py,configs/mtl3.py --seeds=0,1,2 \\
      --set=model.reverse_stop_gradient=False,True --set=loss.dice_weight=0.5,0.7 \\
      --root=runs/sweep --mode=slurm -- --config.data.manual_dir=/data

is 2 x 3 x 2 x 2 = 24 runs. Each trains in its own workdir under --root, named from the grid
point: runs/sweep/mtl2/seed0/reverse_stop_gradient=True,dice_weight=0.7. Arguments after `--`
go to every run. --set=KEY=V1,V2,... adds an axis over config field KEY (commas inside
brackets or quotes do not split: --set="data.image_size=(192,256),(96,128)").

  --mode=local   runs them here one after another (stops at the first failure unless
                 --keep_going; --python picks the interpreter, default $PYTHON or this one)
  --mode=slurm   submits each with `sbatch launch/slurm.sbatch ARGS` ($SBATCH or --sbatch
                 picks the executable; --sbatch_args="--partition=gpu --time=2-00:00:00")
  --mode=print   prints each run's command, one per line, shell-quoted

Local and slurm modes skip runs whose workdir has metrics.json (finished) unless --force;
an unfinished run resumes from its checkpoint. --dry_run shows what would be run or submitted
and writes nothing. Otherwise ROOT/sweep.json lists every run: name, workdir, args (the
arguments of `python -m skinmtl_jax.main`) and what became of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import itertools
import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
from typing import Sequence

SBATCH_SCRIPT = pathlib.Path(__file__).resolve().parent / 'slurm.sbatch'
PREEMPTED_EXIT_CODE = 75  # skinmtl_jax.preemption.PREEMPTED_EXIT_CODE (not imported: no jax here)

_UNSAFE = re.compile(r'[^A-Za-z0-9._+-]+')
_MAX_COMPONENT = 200  # file names may have 255 bytes


@dataclasses.dataclass(frozen=True)
class Run:
  name: str                       # e.g. mtl2/seed0/reverse_stop_gradient=True
  workdir: str                    # root/name
  config: str
  seed: int
  overrides: tuple[tuple[str, str], ...]
  args: tuple[str, ...]           # arguments of `python -m skinmtl_jax.main`

  def command(self, python: str = 'python') -> list[str]:
    return [python, '-m', 'skinmtl_jax.main', *self.args]


def split_values(text: str) -> list[str]:
  """Splits on commas outside (), [], {} and quotes: 'a,(1,2),"x,y"' -> [a, (1,2), "x,y"]."""
  values, current, depth, quote = [], [], 0, None
  for ch in text:
    if quote:
      quote = None if ch == quote else quote
    elif ch in '\'"':
      quote = ch
    elif ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth = max(depth - 1, 0)
    elif ch == ',' and depth == 0:
      values.append(''.join(current))
      current = []
      continue
    current.append(ch)
  values.append(''.join(current))
  return values


def parse_set(spec: str) -> tuple[str, list[str]]:
  """'model.reverse_mode=params,activations' -> ('model.reverse_mode', [params, activations])."""
  key, sep, text = spec.partition('=')
  key = key.strip()
  if key.startswith('config.'):
    key = key[len('config.'):]
  if not sep or not re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*', key):
    raise ValueError(f'--set={spec!r}: expected KEY=V1,V2,... with KEY a config field such as '
                     'loss.dice_weight')
  if key == 'seed':
    raise ValueError('--set=seed=...: use --seeds')
  return key, split_values(text)


def parse_seeds(text: str) -> list[int]:
  """'0,1,2' or '0-4' (inclusive) or a mix: '0-2,7'."""
  seeds = []
  for part in text.split(','):
    part = part.strip()
    m = re.fullmatch(r'(\d+)-(\d+)', part)
    if m:
      seeds.extend(range(int(m.group(1)), int(m.group(2)) + 1))
    elif re.fullmatch(r'-?\d+', part):
      seeds.append(int(part))
    else:
      raise ValueError(f'--seeds: {part!r} is not an integer or a range A-B')
  return seeds


def sanitize(text: str) -> str:
  """A readable path component for `text`, unique: a hash is appended when characters change."""
  safe = _UNSAFE.sub('_', text).strip('_')
  if safe != text or safe in ('', '.', '..') or len(safe) > _MAX_COMPONENT:
    digest = hashlib.sha1(text.encode('utf-8')).hexdigest()[:8]
    safe = f'{safe[:_MAX_COMPONENT]}-{digest}' if safe.strip('.') else digest
  return safe


def _shorten(component: str) -> str:
  if len(component) <= _MAX_COMPONENT:
    return component
  return component[:_MAX_COMPONENT] + '-' + hashlib.sha1(component.encode('utf-8')).hexdigest()[:8]


def _config_path(config: str) -> str:
  """mtl3 -> configs/mtl3.py; mtl3:cpu -> configs/mtl3.py:cpu; a path stays as it is."""
  file, colon, size = config.partition(':')
  return (file if file.endswith('.py') else f'configs/{file}.py') + colon + size


def _config_name(config: str) -> str:
  """configs/mtl3.py -> mtl3; configs/mtl3.py:cpu (a size) -> mtl3-cpu."""
  file, _, arg = config.partition(':')
  stem = pathlib.PurePath(file).name.removesuffix('.py')
  return f'{stem}-{arg}' if arg else stem


def _labels(keys: Sequence[str]) -> dict[str, str]:
  """The shortest dotted suffix of each key that no other key shares (dice_weight, not
  loss.dice_weight, unless another axis also ends in dice_weight)."""
  labels = {}
  for key in keys:
    parts = key.split('.')
    for n in range(1, len(parts) + 1):
      label = '.'.join(parts[-n:])
      if not any(k != key and (k == label or k.endswith('.' + label)) for k in keys):
        break
    labels[key] = label
  return labels


def expand(configs: Sequence[str], seeds: Sequence[int],
           sets: Sequence[tuple[str, Sequence[str]]], root: str,
           extra: Sequence[str] = ()) -> list[Run]:
  """The grid configs x seeds x each set's values, in that nesting order (last axis fastest)."""
  if not configs:
    raise ValueError('no configs')
  if not seeds:
    raise ValueError('no seeds')
  keys = [k for k, _ in sets]
  if len(set(keys)) != len(keys):
    raise ValueError(f'a config field is swept twice: {keys}')
  for key, values in sets:
    if not values:
      raise ValueError(f'--set={key}: no values')
    if len(set(values)) != len(values):
      raise ValueError(f'--set={key}: repeated value in {list(values)}')
  swept = {'--config', '--workdir', '--config.seed', *(f'--config.{k}' for k in keys)}
  for arg in extra:
    if arg.split('=')[0] in swept:
      raise ValueError(f'extra argument {arg!r} would override what the sweep sets')
  stems = [sanitize(_config_name(c)) for c in configs]
  if len(set(stems)) != len(stems):
    raise ValueError(f'two configs have the same name: {list(configs)}')
  labels = _labels(keys)

  runs = []
  for config, stem in zip(configs, stems):
    for seed in seeds:
      for values in itertools.product(*[v for _, v in sets]):
        overrides = tuple(zip(keys, values))
        parts = [stem, f'seed{seed}']
        if overrides:
          parts.append(_shorten(','.join(f'{labels[k]}={sanitize(v)}' for k, v in overrides)))
        name = '/'.join(parts)
        workdir = os.path.join(root, *parts)
        args = (f'--config={config}', f'--workdir={workdir}', f'--config.seed={seed}',
                *(f'--config.{k}={v}' for k, v in overrides), *extra)
        runs.append(Run(name, workdir, config, seed, overrides, args))
  names = [r.name for r in runs]
  if len(set(names)) != len(names):
    shared = sorted({n for n in names if names.count(n) > 1})
    raise ValueError(f'runs would share a workdir: {shared}')
  return runs


def job_name(run: Run) -> str:
  return 'skinmtl-' + re.sub(r'[^A-Za-z0-9._=-]+', '_', run.name.replace('/', '-'))


def sbatch_command(run: Run, sbatch: str = 'sbatch', sbatch_args: Sequence[str] = ()) -> list[str]:
  return [sbatch, '--parsable', f'--job-name={job_name(run)}',
          f'--output={os.path.join(run.workdir, "slurm-%j.out")}', *sbatch_args,
          str(SBATCH_SCRIPT), *run.args]


def is_finished(run: Run) -> bool:
  return os.path.exists(os.path.join(run.workdir, 'metrics.json'))


def write_manifest(root: str, mode: str, runs: Sequence[Run], status: dict[str, dict]) -> str:
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, 'sweep.json')
  manifest = {
      'created': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
      'mode': mode,
      'command': [sys.executable, *sys.argv],
      'runs': [{'name': r.name, 'workdir': r.workdir, 'config': r.config, 'seed': r.seed,
                'overrides': dict(r.overrides), 'args': list(r.args), **status.get(r.name, {})}
               for r in runs],
  }
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(manifest, f, indent=2)
    f.write('\n')
  os.replace(path + '.tmp', path)
  return path


class _ForwardSigterm:
  """While running a child, SIGTERM to the sweep is passed on to it (it saves and exits 75)."""

  def __init__(self):
    self.child = None
    self.received = False

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame):
    del frame
    self.received = True
    if self.child is not None and self.child.poll() is None:
      self.child.send_signal(signum)


def run_local(runs: Sequence[Run], python: str, force: bool, keep_going: bool,
              dry_run: bool, status: dict[str, dict]) -> int:
  """Runs each run in turn; returns the exit status of the sweep."""
  failed = []
  preempted = False
  with _ForwardSigterm() as term:
    for i, run in enumerate(runs, 1):
      cmd = run.command(python)
      if term.received or preempted or (failed and not keep_going):
        status[run.name] = {'status': 'not run'}
        continue
      if is_finished(run) and not force:
        print(f'[{i}/{len(runs)}] skip {run.name}: metrics.json exists (--force reruns it)',
              flush=True)
        status[run.name] = {'status': 'skipped'}
        continue
      print(f'[{i}/{len(runs)}] {run.name}\n  {shlex.join(cmd)}', flush=True)
      if dry_run:
        continue
      term.child = subprocess.Popen(cmd)  # pylint: disable=consider-using-with
      if term.received:  # SIGTERM came while the child was starting, before it could be passed on
        term.child.send_signal(signal.SIGTERM)
      code = term.child.wait()
      term.child = None
      if code == 0:
        status[run.name] = {'status': 'succeeded'}
      elif code == PREEMPTED_EXIT_CODE:
        status[run.name] = {'status': 'preempted', 'returncode': code}
        preempted = True
        print(f'sweep: {run.name} saved a checkpoint and stopped (SIGTERM); rerun the same '
              'sweep command to resume it and run the rest.', file=sys.stderr, flush=True)
      else:
        status[run.name] = {'status': 'failed', 'returncode': code}
        failed.append(run.name)
        print(f'sweep: {run.name} FAILED with exit status {code}; workdir {run.workdir}'
              + ('' if keep_going else '; stopping (--keep_going runs the rest)'),
              file=sys.stderr, flush=True)
  if dry_run:
    return 0
  counts = {}
  for s in status.values():
    counts[s['status']] = counts.get(s['status'], 0) + 1
  print('sweep: ' + ', '.join(f'{n} {k}' for k, n in sorted(counts.items())), flush=True)
  for name in failed:
    print(f'  failed: {name}', flush=True)
  if failed:
    return 1
  return PREEMPTED_EXIT_CODE if preempted or term.received else 0


def run_slurm(runs: Sequence[Run], sbatch: str, sbatch_args: Sequence[str], force: bool,
              dry_run: bool, python: str | None, status: dict[str, dict]) -> int:
  env = dict(os.environ)
  if python:
    env['PYTHON'] = python  # slurm.sbatch runs $PYTHON; sbatch passes the environment on
  failed = 0
  for i, run in enumerate(runs, 1):
    if is_finished(run) and not force:
      print(f'[{i}/{len(runs)}] skip {run.name}: metrics.json exists (--force resubmits it)',
            flush=True)
      status[run.name] = {'status': 'skipped'}
      continue
    cmd = sbatch_command(run, sbatch, sbatch_args)
    print(f'[{i}/{len(runs)}] {shlex.join(cmd)}', flush=True)
    if dry_run:
      continue
    os.makedirs(run.workdir, exist_ok=True)  # SLURM writes its log there
    try:
      out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
      detail = getattr(e, 'stderr', None) or str(e)
      print(f'sweep: submitting {run.name} failed: {detail.strip()}', file=sys.stderr, flush=True)
      status[run.name] = {'status': 'submit failed'}
      failed += 1
      continue
    job_id = out.stdout.strip().split(';')[0]
    print(f'  job {job_id}', flush=True)
    status[run.name] = {'status': 'submitted', 'job_id': job_id}
  if failed:
    print(f'sweep: {failed} of {len(runs)} submissions failed', file=sys.stderr)
  return 1 if failed else 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  argv = list(argv)
  extra = []
  if '--' in argv:
    cut = argv.index('--')
    argv, extra = argv[:cut], argv[cut + 1:]
  parser = argparse.ArgumentParser(
      prog='python launch/sweep.py', description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument('--configs', required=True,
                      help='comma-separated config files (configs/mtl2.py or mtl2)')
  parser.add_argument('--seeds', default='0', help='comma-separated seeds or ranges (0-4)')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=V1,V2',
                      help='a config field and its values; repeatable, one axis each')
  parser.add_argument('--root', required=True, help='folder of the workdirs and sweep.json')
  parser.add_argument('--mode', choices=('local', 'slurm', 'print'), default='print')
  parser.add_argument('--dry_run', action='store_true', help='show, run nothing, write nothing')
  parser.add_argument('--force', action='store_true', help='also (re)run finished runs')
  parser.add_argument('--keep_going', action='store_true',
                      help='local: run the rest after a failure')
  parser.add_argument('--python', default=None,
                      help='interpreter of the runs (default $PYTHON, else this one; slurm: '
                      'sets PYTHON for the job)')
  parser.add_argument('--sbatch', default=os.environ.get('SBATCH', 'sbatch'),
                      help='sbatch executable (default $SBATCH or sbatch)')
  parser.add_argument('--sbatch_args', default='', help='extra sbatch options, one string')
  args = parser.parse_args(argv)
  args.extra = extra
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    configs = [_config_path(c) for c in (c.strip() for c in args.configs.split(',')) if c]
    for config in configs:
      if not os.path.isfile(config.partition(':')[0]):
        raise ValueError(f'config file {config} not found (run from the repository root?)')
    runs = expand(configs, parse_seeds(args.seeds), [parse_set(s) for s in args.set],
                  args.root, args.extra)
  except ValueError as e:
    print(f'sweep: {e}', file=sys.stderr)
    return 2
  python = args.python or os.environ.get('PYTHON') or sys.executable

  if args.mode == 'print':
    for run in runs:
      print(shlex.join(run.command(python)))
    if not args.dry_run:
      write_manifest(args.root, args.mode, runs, {})
    return 0

  print(f'sweep: {len(runs)} runs under {args.root} ({args.mode})', flush=True)
  status: dict[str, dict] = {}
  if not args.dry_run:
    write_manifest(args.root, args.mode, runs, {r.name: {'status': 'pending'} for r in runs})
  if args.mode == 'local':
    code = run_local(runs, python, args.force, args.keep_going, args.dry_run, status)
  else:
    code = run_slurm(runs, args.sbatch, shlex.split(args.sbatch_args), args.force,
                     args.dry_run, args.python, status)
  if not args.dry_run:
    print(f'sweep: manifest {write_manifest(args.root, args.mode, runs, status)}')
  return code


if __name__ == '__main__':
  sys.exit(main())
