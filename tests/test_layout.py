"""The package's shape: README's layout lists every module in the order data travels, each
imports only modules listed above it (so there is no import circle), and no function imports a
project module."""

import ast
import re

from conftest import ROOT

PACKAGE = ROOT / 'skinmtl_jax'


def _module_name(path) -> str:
  rel = path.relative_to(ROOT).with_suffix('')
  parts = rel.parts[:-1] if rel.name == '__init__' else rel.parts
  return '.'.join(parts)


def _project_imports(tree) -> list[tuple[ast.AST, str]]:
  """(node, imported project module) for every import of a skinmtl_jax module."""
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('skinmtl_jax'):
      for alias in node.names:
        full = f'{node.module}.{alias.name}'
        is_module = (ROOT / (full.replace('.', '/') + '.py')).exists() or (
            ROOT / full.replace('.', '/')).is_dir()
        out.append((node, full if is_module else node.module))
    elif isinstance(node, ast.Import):
      out += [(node, a.name) for a in node.names if a.name.startswith('skinmtl_jax')]
  return out


def _layout_order() -> list[str]:
  """Module names in README's layout block, top to bottom ('models/' -> skinmtl_jax.models)."""
  text = (ROOT / 'README.md').read_text(encoding='utf-8')
  block = text.split('## Layout', 1)[1].split('```')[1]
  names = []
  for line in block.splitlines():
    m = re.match(r'  (\w+)(\.py|/)', line)
    if m:
      names.append(f'skinmtl_jax.{m.group(1)}')
  return names


def _top_module(name: str) -> str:
  """skinmtl_jax.datasets.files -> skinmtl_jax.datasets (the layout lists packages whole)."""
  return '.'.join(name.split('.')[:2])


def test_every_module_is_listed_and_imports_only_modules_above_it():
  order = _layout_order()
  files = [p for p in PACKAGE.rglob('*.py') if '__pycache__' not in p.parts]
  top = {_top_module(_module_name(p)) for p in files} - {'skinmtl_jax'}
  assert top == set(order), f'README layout and the package differ: {top ^ set(order)}'
  for path in files:
    name = _top_module(_module_name(path))
    for _, dep in _project_imports(ast.parse(path.read_text(encoding='utf-8'))):
      dep = _top_module(dep)
      if dep != name and name != 'skinmtl_jax':
        assert order.index(dep) < order.index(name), \
            f'{path.relative_to(ROOT)} imports {dep}, listed below it in README\'s layout'


def test_no_function_imports_a_project_module():
  for path in PACKAGE.rglob('*.py'):
    tree = ast.parse(path.read_text(encoding='utf-8'))
    top_level = {id(n) for n in tree.body}
    for node, dep in _project_imports(tree):
      assert id(node) in top_level, \
          f'{path.relative_to(ROOT)}:{node.lineno} imports {dep} inside a function or block'
