"""Every config loads, opens with a docstring naming its command, and passes validation."""

import importlib

import pytest

from conftest import ROOT, tiny_config
from skinmtl_jax import train
from skinmtl_jax.config_base import ConfigError

CONFIGS = sorted(p.stem for p in (ROOT / 'configs').glob('*.py') if p.stem != '__init__')


def test_all_expected_configs_exist():
  assert {'unet', 'resnet50', 'mtl0', 'mtl1', 'mtl2', 'mtl3', 'mtl4', 'demo', 'tiny'} <= set(CONFIGS)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_loads_and_documents_itself(name):
  module = importlib.import_module(f'configs.{name}')
  assert f'--config=configs/{name}.py' in module.__doc__
  cfg = module.get_config()
  assert cfg.batch_size >= 1 and len(cfg.data.image_size) == 2


def test_paper_defaults():
  cfg = importlib.import_module('configs.mtl4').get_config()
  assert (cfg.loss.dice_weight, cfg.loss.cls_weight) == (0.5, 0.5)
  assert (cfg.optim.learning_rate, cfg.optim.final_learning_rate) == (3e-3, 3e-4)
  assert (cfg.batch_size, cfg.num_epochs, tuple(cfg.data.image_size)) == (10, 50, (192, 256))
  assert (cfg.data.enlarge_benign, cfg.data.enlarge_melanoma) == (4, 16)


@pytest.mark.parametrize('field,value,match', [
    ('model.reverse', True, 'model.classify'),
    ('data.enlarge_melanoma', 17, 'data.enlarge_melanoma'),
    ('batch_size', 0, 'batch_size'),
])
def test_nonsense_settings_are_rejected_by_name(field, value, match):
  cfg = tiny_config('unet')
  section, _, key = field.rpartition('.')
  (cfg[section] if section else cfg)[key] = value
  with pytest.raises(ConfigError, match=match):
    train.validate_config(cfg)


def test_launch_scripts_parse():
  import subprocess
  for script in (ROOT / 'launch').glob('*.sh'):
    r = subprocess.run(['bash', '-n', str(script)], capture_output=True, text=True)
    assert r.returncode == 0, (script, r.stderr)
  r = subprocess.run(['bash', str(ROOT / 'launch' / 'ladder.sh')], capture_output=True, text=True)
  assert r.returncode == 2 and 'usage' in r.stderr
