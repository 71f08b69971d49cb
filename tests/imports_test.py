"""No import circle in dtvit/: the graph of every import statement (those inside functions too) has no cycle.

A module `a` depends on `b` when any of its import statements names `b` (`import dtvit.b`, `from dtvit import b`,
`from dtvit.b import x`, relative forms alike). A package's `__init__` counts only where it is imported by name:
importing `dtvit.models.paths` runs `dtvit/models/__init__.py` first, but that is Python's package mechanics,
not a dependency of `paths` on what the package gathers.
"""
import ast
import os
import textwrap

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules(root: str, package: str) -> dict[str, str]:
  """{dotted module name: file} for every .py file under `root`/`package` (packages by their __init__)."""
  found = {}
  for folder, _, files in os.walk(os.path.join(root, package)):
    for name in files:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(folder, name), root)[:-3].split(os.sep)
        found[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(folder, name)
  return found


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
  """The modules of `known` an import statement names."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names if a.name in known]
  if not isinstance(node, ast.ImportFrom):
    return []
  base = node.module or ""
  if node.level:  # relative: from the module's package, one level up per extra dot
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[:len(parts) - (node.level - 1)]
    base = ".".join(parts + ([base] if base else []))
  out = []
  for alias in node.names:
    sub = f"{base}.{alias.name}"
    if sub in known:  # `from package import submodule`
      out.append(sub)
    elif base in known:
      out.append(base)
  return out


def import_graph(root: str, package: str = "dtvit") -> dict[str, set[str]]:
  """{module: the modules of `package` it imports}, from every import statement in its source."""
  files = _modules(root, package)
  graph = {}
  for module, path in files.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), filename=path)
    is_package = path.endswith("__init__.py")
    graph[module] = {m for node in ast.walk(tree) for m in _imported(node, module, is_package, set(files))
                     if m != module}
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The import circles of `graph`: its strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_dtvit_has_no_import_circle():
  graph = import_graph(REPO_ROOT)
  assert len(graph) > 40 and "dtvit.neurons" in graph["dtvit.models.layers"]  # the graph is the real one
  assert cycles(graph) == []


def _write(root, files: dict[str, str]) -> None:
  for rel, text in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


@pytest.mark.parametrize("b_source", [
    "from pkg import a\n",
    "def f():\n  import pkg.a\n",         # an import inside a function counts
    "from .a import g\n",                 # a relative one too
])
def test_a_circle_of_two_modules_is_found(tmp_path, b_source):
  _write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "from pkg import b\ndef g():\n  pass\n",
                    "pkg/b.py": b_source, "pkg/c.py": "from pkg import a, b\n"})
  graph = import_graph(str(tmp_path), "pkg")
  assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.c"] == {"pkg.a", "pkg.b"}
  assert cycles(graph) == [["pkg.a", "pkg.b"]]


def test_a_package_importing_its_submodules_is_no_circle(tmp_path):
  _write(tmp_path, {"pkg/__init__.py": "from pkg.sub import x\n", "pkg/sub/__init__.py": "from . import y\n",
                    "pkg/sub/x.py": "from pkg.sub import y\n", "pkg/sub/y.py": "import os\n"})
  graph = import_graph(str(tmp_path), "pkg")
  assert graph == {"pkg": {"pkg.sub.x"}, "pkg.sub": {"pkg.sub.y"}, "pkg.sub.x": {"pkg.sub.y"}, "pkg.sub.y": set()}
  assert cycles(graph) == []
