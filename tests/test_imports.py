"""The package's import graph: no cycles, and models/ stays free of training and experiments.

Every `.py` file of `dsi_jax/` and of `tasks/` (installed as `dsi_jax.tasks`) is read with
`ast`; every import of a `dsi_jax` module counts, at module level or inside a function,
absolute or relative, and those under `if TYPE_CHECKING:` too (a type-only cycle is still a
tangle: move the shared piece down instead).
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Source folders and the package each one installs as (setup.py's package_dir).
PACKAGES = {"dsi_jax": ROOT / "dsi_jax", "dsi_jax.tasks": ROOT / "tasks"}


def _modules() -> dict[str, pathlib.Path]:
  """Module name -> file (a package is its `__init__.py`)."""
  out = {}
  for package, folder in PACKAGES.items():
    for path in sorted(folder.rglob("*.py")):
      parts = list(path.relative_to(folder).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join([package, *parts])] = path
  return out


MODULES = _modules()


def _known(name: str) -> str | None:
  """`name`, or the nearest enclosing module that exists (None outside dsi_jax)."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def _import_nodes(tree: ast.AST):
  """Every Import / ImportFrom node of the file."""
  return (n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom))


def imports_of(module: str) -> set[str]:
  """The dsi_jax modules that `module` imports."""
  path = MODULES[module]
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  out = set()
  for node in _import_nodes(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    else:
      base = node.module or ""
      if node.level:
        anchor = package.split(".")
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, *([base] if base else [])])
      # `from pkg import mod` imports the module pkg.mod where that file exists, else pkg.
      names = [
        f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
        for alias in node.names
      ]
    for name in names:
      if name == "dsi_jax" or name.startswith("dsi_jax."):
        target = _known(name)
        if target and target != module:
          out.add(target)
  return out


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
  """Tarjan's strongly connected components (iterative), each sorted."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  components = []
  for root in sorted(graph):
    if root in index:
      continue
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = len(index)
    stack.append(root)
    on_stack.add(root)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = len(index)
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph.get(child, ())))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        component = []
        while True:
          member = stack.pop()
          on_stack.discard(member)
          component.append(member)
          if member == node:
            break
        components.append(sorted(component))
  return components


def test_the_finder_resolves_modules_and_packages():
  assert "dsi_jax.models.dsi" in imports_of("dsi_jax.train")  # from dsi_jax.models import dsi
  assert "dsi_jax.tasks.core" in imports_of("dsi_jax.tasks")  # tasks/ installs as dsi_jax.tasks
  assert strongly_connected({"a": {"b"}, "b": {"a", "c"}, "c": set()}) == [["c"], ["a", "b"]]


def test_no_import_cycles():
  graph = {module: imports_of(module) for module in MODULES}
  cycles = [c for c in strongly_connected(graph) if len(c) > 1]
  assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


# What the networks must not depend on: training, optimisers, baselines and experiments.
FORBIDDEN_IN_MODELS = (
  "dsi_jax.train",
  "dsi_jax.optim",
  "dsi_jax.baselines",
  "dsi_jax.experiments",
  "dsi_jax.experiment",
  "dsi_jax.flickr",
  "dsi_jax.squad",
  "dsi_jax.demo",
  "dsi_jax.cli",
)


def test_models_import_no_training_or_experiments():
  bad = {}
  for module in MODULES:
    if module.startswith("dsi_jax.models."):
      hits = sorted(
        name
        for name in imports_of(module)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN_IN_MODELS)
      )
      if hits:
        bad[module] = hits
  assert not bad, bad
