"""Test setup: CPU only, and real-data tests that skip when ../shared/data is absent unless
SKINMTL_REQUIRE_DATA=1 (set by .ci/run), which turns that skip into a failure."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# A persistent compilation cache shared by the tests and the training subprocesses they start:
# many tests compile the same tiny models.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    __import__('tempfile').gettempdir(), f'skinmtl_jax_test_cache_{os.getuid()}'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import pathlib  # pylint: disable=wrong-import-position

import pytest  # pylint: disable=wrong-import-position

# tests/helpers.py holds asserts the test modules share: rewritten like theirs (before any
# test module imports it), so a failing one shows its values.
pytest.register_assert_rewrite('helpers')

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / 'shared' / 'data'


@pytest.fixture(scope='session')
def shared_data():
  """Path of the real data in ../shared/data; skips (or fails under CI) when absent."""
  if not SHARED_DATA.is_dir():
    if os.environ.get('SKINMTL_REQUIRE_DATA') == '1':
      pytest.fail(f'{SHARED_DATA} is missing and SKINMTL_REQUIRE_DATA=1.')
    pytest.skip(f'{SHARED_DATA} not present')
  return SHARED_DATA


def bias_before_batchnorm(path) -> bool:
  """Whether a parameter path is a conv bias that feeds BatchNorm: its true gradient is zero
  (BatchNorm removes any shift), so runs that differ only in round-off move it differently."""
  keys = [getattr(k, 'key', None) for k in path]
  return keys[-2:] == ['conv', 'bias'] and any(str(k).startswith('block') for k in keys)


def tiny_config(name: str = 'tiny'):
  """A tiny config of the same code; `name` picks the model of configs/<name>.py."""
  import importlib  # pylint: disable=import-outside-toplevel
  from configs import tiny  # pylint: disable=import-outside-toplevel
  c = tiny.get_config()
  if name != 'tiny':
    model = importlib.import_module(f'configs.{name}').get_config().model
    for k in ('arch', 'classify', 'attention_pool', 'reverse', 'reverse_mode',
              'reverse_stop_gradient', 'encoder_pool_levels', 'cbam'):
      c.model[k] = model[k]
  return c
