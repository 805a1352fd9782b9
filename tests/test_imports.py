"""The package's import graph is acyclic: every import of a package module, at the top of a file or
inside a function, is an edge; the test fails naming each cycle."""

import ast
import os
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ldm_scaling"


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = path
  return out


def import_graph() -> dict[str, set[str]]:
  """module -> the package modules it imports (``from pkg import sub`` is an edge to ``pkg.sub``
  when that is a module, else to ``pkg``)."""
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                   else node.module for a in node.names]
      else:
        continue
      edges.update(t for t in targets if t in modules and t != name)
    graph[name] = edges
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, on_stack, stack, out = {}, {}, set(), [], []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
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
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_cycle_finder_finds_a_hand_made_cycle():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_package_import_graph_is_acyclic():
  graph = import_graph()
  assert "ldm_scaling.train.trainer" in graph and graph["ldm_scaling.train.trainer"]
  found = cycles(graph)
  assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_config_schema_imports_no_stage():
  graph = import_graph()
  assert graph["ldm_scaling.config"] <= {"ldm_scaling.errors"}
  assert graph["ldm_scaling.errors"] == set()
  assert os.path.isfile(PACKAGE / "errors.py")
