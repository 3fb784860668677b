"""Every config loads, opens with a docstring naming its command, and passes validation."""

import importlib
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_config
from skinmtl_jax import config_base
from skinmtl_jax.config_base import ConfigError

CONFIGS = sorted(p.stem for p in (ROOT / 'configs').glob('*.py') if p.stem != '__init__')


def test_all_expected_configs_exist():
  assert {'unet', 'resnet50', 'mtl0', 'mtl1', 'mtl2', 'mtl3', 'mtl4', 'demo', 'tiny'} <= set(CONFIGS)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_loads_and_documents_itself(name):
  module = importlib.import_module(f'configs.{name}')
  assert f'--config=configs/{name}.py' in module.__doc__
  cfg = module.get_config()
  config_base.validate_config(cfg)   # every shipped config is one that runs
  assert cfg.experiment == name and cfg.batch_size >= 1


def test_paper_defaults():
  cfg = importlib.import_module('configs.mtl4').get_config()
  assert (cfg.loss.dice_weight, cfg.loss.cls_weight) == (0.5, 0.5)
  assert (cfg.optim.learning_rate, cfg.optim.final_learning_rate) == (3e-3, 3e-4)
  assert (cfg.batch_size, cfg.num_epochs, tuple(cfg.data.image_size)) == (10, 50, (192, 256))
  assert (cfg.data.enlarge_benign, cfg.data.enlarge_melanoma) == (4, 16)


PAPER_CONFIGS = ('default', 'unet', 'resnet50', 'mtl0', 'mtl1', 'mtl2', 'mtl3', 'mtl4')
CPU_SIZED = {'data.image_size', 'model.features', 'model.cls_hidden', 'model.resnet_width',
             'num_epochs', 'log_every_steps', 'checkpoint_every_steps'}


def _flat(d, prefix=''):
  out = {}
  for k in d.keys():
    out.update(_flat(d[k], f'{prefix}{k}.') if hasattr(d[k], 'keys') else {f'{prefix}{k}': d[k]})
  return out


@pytest.mark.parametrize('name', PAPER_CONFIGS)
def test_cpu_size_changes_only_the_sized_fields(name):
  module = importlib.import_module(f'configs.{name}')
  full, cpu = _flat(module.get_config()), _flat(module.get_config('cpu'))
  assert _flat(module.get_config('full')) == full
  assert {k for k in full if full[k] != cpu[k]} == CPU_SIZED   # one place sets the size
  assert (cpu['data.image_size'], cpu['num_epochs']) == ((96, 128), 2)
  config_base.validate_config(module.get_config('cpu'))
  study = _flat(module.get_config('study'))
  assert {k for k in full if full[k] != study[k]} == CPU_SIZED | {'eval_every_epochs'}
  assert (study['data.image_size'], study['eval_every_epochs']) == ((64, 96), 1)
  config_base.validate_config(module.get_config('study'))


@pytest.mark.parametrize('config,message', [
    ('configs/mtl3.py:gpu', "config size 'gpu': expected one of ('full', 'cpu', 'study')"),
    ('configs/demo.py:cpu', 'only the paper configs take a size'),
])
def test_a_wrong_size_is_refused_in_one_line(tmp_path, config, message):
  r = subprocess.run([sys.executable, '-m', 'skinmtl_jax.main', f'--config={config}',
                      f'--workdir={tmp_path}'], cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 1 and message in r.stderr.strip().splitlines()[-1]
  assert 'Traceback' not in r.stderr and not any(tmp_path.iterdir())


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
    config_base.validate_config(cfg)


def test_launch_scripts_parse():
  import subprocess
  for script in (ROOT / 'launch').glob('*.sh'):
    r = subprocess.run(['bash', '-n', str(script)], capture_output=True, text=True)
    assert r.returncode == 0, (script, r.stderr)
  r = subprocess.run(['bash', str(ROOT / 'launch' / 'ladder.sh')], capture_output=True, text=True)
  assert r.returncode == 2 and 'usage' in r.stderr


def test_dependency_pins_cover_what_is_used_and_tested():
  import tomllib
  from importlib import metadata
  from packaging.requirements import Requirement
  project = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
  deps = {r.name: r for r in map(Requirement, project['dependencies'])}
  jax_spec = deps['jax'].specifier
  assert '0.6.0' not in jax_spec and '0.6.1' in jax_spec    # jax.shard_map is from 0.6.1
  assert '0.10.2' in jax_spec and '0.11.2' in jax_spec       # tested here / on the GPU machines
  assert '0.12.0' not in jax_spec                           # untested: an upper bound
  assert '1.0.0' not in deps['orbax-checkpoint'].specifier  # 1.0 moves the V1 API
  assert {'scipy', 'tensorboard'} <= set(deps)              # imported directly; event files
  assert not {'tensorflow', 'tensorflow-cpu'} & set(deps)        # TensorBoard without it
  extras = project['optional-dependencies']
  assert Requirement(extras['cuda'][0]).extras == {'cuda12'}
  assert Requirement(extras['cuda13'][0]).extras == {'cuda13'}
  # The installed versions satisfy the pins.
  for name in ('jax', 'orbax-checkpoint', 'scipy', 'tensorboard'):
    assert deps[name].specifier.contains(metadata.version(name), prereleases=True), name


def test_every_field_fact_names_a_field_whose_default_it_allows():
  cfg = config_base.get_config()
  for name, field in config_base.FIELDS.items():
    group, _, key = name.rpartition('.')
    holder = cfg[group] if group else cfg
    assert key in holder, name
    assert not field.choices or holder[key] in field.choices, name


def test_a_saved_config_is_read_on_todays_defaults():
  """A run's config.json from before fields existed loads with every field: the value the run
  behaved as where it differs from today's default (data.validation_fraction: older runs
  trained on every image), else the default; its own values and fields the code dropped stay."""
  saved = config_base.get_config().to_dict()
  del saved['num_seeds'], saved['decision'], saved['model']['dtype']
  del saved['data']['validation_fraction']
  saved['model']['cls_hidden'], saved['dropped_since'] = 7, 'kept'
  c = config_base.from_saved(saved)
  assert c.num_seeds == 1 and c.model.dtype == 'float32'
  assert c.decision.to_dict() == config_base.get_config().decision.to_dict()
  assert c.data.validation_fraction == 0.0
  assert c.model.cls_hidden == 7 and c.dropped_since == 'kept'
  config_base.validate_config(c)
