"""The package's imports run down the layers of docs/ARCHITECTURE.md, never in a cycle."""
import ast
import os

import pytest

PACKAGE = "dsno_jax"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)

# Lowest first; a module may import modules of its own layer or of layers below it.
LAYERS = (
    ("dsno_jax", "dsno_jax.backend", "dsno_jax.storage", "dsno_jax.workdir", "dsno_jax.lock",
     "dsno_jax.trees", "dsno_jax.parallel", "dsno_jax.preemption", "dsno_jax.pictures",
     "dsno_jax.weights", "dsno_jax.errors"),  # shared
    ("dsno_jax.diffusion", "dsno_jax.ode"),  # the maths
    ("dsno_jax.data",),
    ("dsno_jax.models",),
    ("dsno_jax.teachers",),
    ("dsno_jax.training",),
    ("dsno_jax.export",),
    ("dsno_jax.evaluation",),
    ("dsno_jax.modes", "dsno_jax.main", "dsno_jax.convert", "dsno_jax.api",
     "dsno_jax.models.__main__", "dsno_jax.preflight", "dsno_jax.console"),  # entry points
)


def _modules():
  """{module name: file path} of every module of the package."""
  found = {}
  for directory, _, files in os.walk(ROOT):
    for name in files:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(directory, name), os.path.dirname(ROOT))
        module = rel[:-3].replace(os.sep, ".")
        found[module[:-len(".__init__")] if module.endswith(".__init__") else module] = \
            os.path.join(directory, name)
  return found


MODULES = _modules()


def layer_of(module: str) -> int:
  """The layer of the longest entry of LAYERS that is `module` or a package above it."""
  best, best_len = None, -1
  for index, names in enumerate(LAYERS):
    for name in names:
      below = module.startswith(name + ".") and name != PACKAGE  # the root holds only itself
      if (module == name or below) and len(name) > best_len:
        best, best_len = index, len(name)
  if best is None:
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and docs/ARCHITECTURE.md)")
  return best


def imports_of(module: str):
  """The package modules that `module` imports (anywhere in the file, functions included)."""
  path = MODULES[module]
  is_package = path.endswith("__init__.py")
  tree = ast.parse(open(path).read(), path)
  if is_package:  # a package's PEP 562 __getattr__ imports on first use, never at import time
    tree.body = [node for node in tree.body
                 if not (isinstance(node, ast.FunctionDef) and node.name == "__getattr__")]
  targets = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative import
        parts = module.split(".")
        parts = parts if is_package else parts[:-1]
        parts = parts[:len(parts) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
      # `from pkg import module` imports that module; `from pkg import name` imports pkg
      names = [f"{base}.{alias.name}" for alias in node.names]
    else:
      continue
    for name in names:
      if not name.startswith(PACKAGE):
        continue
      while name not in MODULES and "." in name:  # `from pkg import function`
        name = name.rsplit(".", 1)[0]
      if name in MODULES and name != module:
        targets.add(name)
  return targets


GRAPH = {module: imports_of(module) for module in MODULES}


def upward_imports(graph, module):
  own = layer_of(module)
  return [f"{target} (layer {layer_of(target)})" for target in sorted(graph[module])
          if layer_of(target) > own]


def find_cycles(graph):
  """Every cycle met by a depth-first walk (a package's __init__ is a node of its own)."""
  state, cycles = {}, []

  def visit(module, stack):
    state[module] = "open"
    for target in sorted(graph.get(module, ())):
      if state.get(target) == "open":
        cycles.append(stack[stack.index(target):] + [target])
      elif target not in state:
        visit(target, stack + [target])
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  return cycles


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_run_down_the_layers(module):
  upward = upward_imports(GRAPH, module)
  assert not upward, f"{module} (layer {layer_of(module)}) imports from a higher layer: {upward}"


def test_no_import_cycles():
  cycles = find_cycles(GRAPH)
  assert not cycles, f"import cycles: {cycles}"


def test_the_checks_find_an_upward_import_a_cycle_and_an_unplaced_module():
  graph = {"dsno_jax.data.images": {"dsno_jax.training.loop"},
           "dsno_jax.training.loop": {"dsno_jax.training.step"},
           "dsno_jax.training.step": {"dsno_jax.training.loop"}}
  assert upward_imports(graph, "dsno_jax.data.images") == ["dsno_jax.training.loop (layer 5)"]
  assert not upward_imports(graph, "dsno_jax.training.loop")
  assert find_cycles(graph) == [["dsno_jax.training.loop", "dsno_jax.training.step",
                                 "dsno_jax.training.loop"]]
  with pytest.raises(AssertionError, match="in no layer"):
    layer_of("dsno_jax.somewhere_new")
  assert "dsno_jax.data.loader" in GRAPH["dsno_jax.data.images"]  # the parser sees imports
  assert "dsno_jax.models" in GRAPH["dsno_jax.teachers.loading"]
  assert "dsno_jax.api" not in GRAPH["dsno_jax"]  # dsno_jax.load, imported on first use
