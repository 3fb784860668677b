"""Where the config goes during a real (tiny) `train_and_evaluate`: only the loop and the
modules about the config itself receive the whole ConfigDict; every other module gets the
fields or the sub-config it reads (issue #31's rule, kept by tracing every call)."""

import sys

import ml_collections

from conftest import tiny_config
from skinmtl_jax import train

# The loop, and the modules whose job is the config itself (validation, the rerun check).
WHOLE_CONFIG_ALLOWED = {'skinmtl_jax.train', 'skinmtl_jax.config_base', 'skinmtl_jax.workdir'}


def config_calls(config: ml_collections.ConfigDict, fn, *args):
  """Runs fn(*args) and returns [(module, function, 'whole' | 'part')] for every call of a
  skinmtl_jax function that received `config` itself ('whole') or one of its sub-configs
  ('part') as an argument, in call order."""
  parts = {id(v) for v in _sub_configs(config)}
  seen = []

  def profile(frame, event, _):
    if event != 'call':
      return
    module = frame.f_globals.get('__name__', '')
    if not module.startswith('skinmtl_jax'):
      return
    code = frame.f_code
    names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
    values = [frame.f_locals.get(n) for n in names]
    if any(v is config for v in values):
      seen.append((module, code.co_name, 'whole'))
    elif any(id(v) in parts for v in values):
      seen.append((module, code.co_name, 'part'))

  sys.setprofile(profile)
  try:
    fn(*args)
  finally:
    sys.setprofile(None)
  return seen


def _sub_configs(c):
  for v in c.values():
    if isinstance(v, ml_collections.ConfigDict):
      yield v
      yield from _sub_configs(v)


def module_walk(calls) -> tuple[list[str], int]:
  """The modules the config visits, in order, and how often it comes back to a module it had
  left (consecutive calls in one module count once)."""
  order, returns = [], 0
  for module, _, _ in calls:
    if order and order[-1] == module:
      continue
    returns += module in order
    order.append(module)
  return list(dict.fromkeys(order)), returns


def test_only_the_loop_receives_the_whole_config(tmp_path):
  cfg = tiny_config('mtl3')
  cfg.num_train_steps = 2
  calls = config_calls(cfg, train.train_and_evaluate, cfg, str(tmp_path / 'run'))
  assert (tmp_path / 'run' / 'metrics.json').exists()
  whole = {m for m, _, kind in calls if kind == 'whole'}
  assert 'skinmtl_jax.train' in whole                  # the tracer sees the loop itself
  assert whole <= WHOLE_CONFIG_ALLOWED, sorted(whole - WHOLE_CONFIG_ALLOWED)
  # Sub-configs do travel (data, optim, model): the trace is of a real run, not an empty one.
  assert {m for m, _, kind in calls if kind == 'part'} - WHOLE_CONFIG_ALLOWED
