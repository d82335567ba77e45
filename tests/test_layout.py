"""The package's shape: small modules, imports that run one way, compilers' rules as data."""

import ast
import pathlib

import networkx as nx
import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "wapar_jax"
MAX_LINES = 500
# Imported inside functions on purpose: optional dependencies, loaded only when used.
OPTIONAL = ("matplotlib", "cloudpickle", "scipy", "orbax")


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = path
  return out


def _imported(node, module: str, is_package: bool, modules=()) -> list[str]:
  """Modules an import statement names (relative imports resolved): `from pkg import sub`
  names pkg.sub when that is a module of ours, else pkg."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names]
  base = node.module or ""
  if node.level:
    parts = module.split(".")
    parts = parts if is_package else parts[:-1]
    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
  return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def _graph() -> nx.DiGraph:
  modules = _modules()
  graph = nx.DiGraph()
  graph.add_nodes_from(modules)
  for name, path in modules.items():
    tree = ast.parse(path.read_text())
    for node in tree.body:
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        for target in _imported(node, name, path.name == "__init__.py", modules):
          if target in modules and target != name:
            graph.add_edge(name, target)
  return graph


def test_no_module_is_too_long():
  long = {
    name: n
    for name, path in _modules().items()
    if (n := len(path.read_text().splitlines())) > MAX_LINES
  }
  assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_imports_run_one_way():
  graph = _graph()
  cycles = list(nx.simple_cycles(graph))
  assert not cycles, f"import cycles: {cycles[:5]}"


def test_no_package_module_is_imported_inside_a_function():
  found = []
  for name, path in _modules().items():
    for node in ast.walk(ast.parse(path.read_text())):
      if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      for inner in ast.walk(node):
        if isinstance(inner, (ast.Import, ast.ImportFrom)):
          names = _imported(inner, name, path.name == "__init__.py")
          if any(n.startswith("wapar_jax") for n in names) or getattr(inner, "level", 0):
            found.append(f"{name}:{inner.lineno}")
  assert not found, f"in-function imports of package modules: {found}"


def test_in_function_imports_are_optional_dependencies_only():
  found = []
  for name, path in _modules().items():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for inner in ast.walk(node):
          if isinstance(inner, ast.Import):
            roots = [a.name.split(".")[0] for a in inner.names]
          elif isinstance(inner, ast.ImportFrom):
            roots = [(inner.module or "").split(".")[0]]
          else:
            continue
          found += [f"{name}:{inner.lineno} {r}" for r in roots if r not in OPTIONAL]
  assert not found, f"in-function imports that are not optional dependencies: {found}"


@pytest.mark.parametrize("stage", ["search", "memory"])
def test_stages_ask_the_rules_not_the_compiler_name(stage):
  # Compilers differ through their CompilerRules objects; a stage never branches on a name.
  offenders = []
  for path in (PACKAGE / "_src" / stage).rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.startswith(("xla:", "gpu", "tpu", "cpu"))
      ):
        offenders.append(f"{path.name}:{node.lineno} {node.value!r}")
  assert not offenders, offenders


def test_public_names_are_reexported_explicitly():
  import wapar_jax

  for name in wapar_jax.__all__:
    assert hasattr(wapar_jax, name), name
  assert all(not name.startswith("_") for name in wapar_jax.__all__)
