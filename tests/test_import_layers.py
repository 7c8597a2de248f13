"""The package's layers: no import cycle between its top-level subpackages and modules, and the
frozen pretrained models at the bottom.

Read from the source (every ``import``, at module level or inside a function), so an import
hidden in a function body counts as much as one at the top.
"""
import ast
import os
from collections import defaultdict
from typing import Dict, List, Optional, Set

PACKAGE = "diffseg_d2"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)


def _unit(module: str) -> str:
    """The top-level subpackage or module a dotted name belongs to (the root package is its own unit)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imported(path: str) -> Set[str]:
    """Every ``diffseg_d2`` module a file imports, as dotted names."""
    module = _module_name(path)
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # "from . import x" imports the submodule x.
            out.update(f"{target}.{a.name}" for a in node.names) if not node.module else out.add(target)
    return {m for m in out if m == PACKAGE or m.startswith(PACKAGE + ".")}


def unit_graph() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = defaultdict(set)
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                source = _unit(_module_name(path))
                graph[source].update(_unit(m) for m in _imported(path) if _unit(m) != source)
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: Dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_top_level_units():
    graph = unit_graph()
    assert {"diffseg_d2.pretrained", "diffseg_d2.diffusion", "diffseg_d2.modeling"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_pretrained_models_are_the_bottom_layer():
    """The frozen pretrained models import none of the layers built on them."""
    graph = unit_graph()
    above = {f"{PACKAGE}.{u}" for u in ("data", "diffusion", "engine", "evaluation", "freeda", "microworld", "modeling")}
    reachable, todo = set(), [f"{PACKAGE}.pretrained"]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in reachable:
                reachable.add(nxt)
                todo.append(nxt)
    assert not reachable & above, f"diffseg_d2.pretrained reaches {sorted(reachable & above)}"
    for user in ("diffusion", "modeling", "freeda", "microworld"):
        assert f"{PACKAGE}.pretrained" in graph[f"{PACKAGE}.{user}"]
