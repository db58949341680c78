"""The package's shape: no import cycle, imports only go down the layer table, a small package root, short modules.

Every module under peftkit/ is parsed with `ast` (nothing is imported) and every import in it is an edge: at module
level, under `if TYPE_CHECKING:`, inside functions (lazy imports), and `importlib.import_module("peftkit...")` with
a literal name. `import peftkit.a.b` is an edge to peftkit.a.b only (the implicit import of the parent packages
peftkit and peftkit.a is not counted); `from peftkit.a import b` is an edge to peftkit.a.b when that is a module,
else to peftkit.a; relative imports are resolved the same way.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT_MODULES_MAX = 10
MODULE_LINES_MAX = 300

ANY = None  # may import every peftkit module
# Layer (a module prefix: the module itself and everything under it) -> the layers its modules may import.
# The longest matching prefix is a module's layer; `peftkit` is the package __init__ only.
LAYERS: dict[str, frozenset[str] | None] = {
    "peftkit.errors": frozenset(),
    "peftkit._version": frozenset(),
    "peftkit.core": frozenset({"core", "errors", "_version"}),
    "peftkit.methods": frozenset({"methods", "core", "errors"}),
    "peftkit.data": frozenset({"data", "core", "io", "errors"}),
    "peftkit.io": frozenset({"io", "core", "errors", "_version"}),
    "peftkit.merging": frozenset({"merging", "io", "methods", "core", "errors"}),  # LoRA's format, by name
    "peftkit.export": frozenset({"export", "io", "methods", "core", "errors"}),  # LoRA's format, by name
    "peftkit.memory": frozenset({"memory", "core", "io", "errors"}),
    "peftkit.train": frozenset({"train", "data", "io", "core", "memory", "export", "errors"}),  # methods via the registry; export: portability's vLLM verdict (GRPO --use-vllm)
    "peftkit.cli": ANY,
    "peftkit.ui": ANY,  # the web page: a front end like the CLI (it shows and runs the CLI's commands)
    "peftkit": frozenset({"errors", "_version", "core", "methods", "data", "io", "merging", "export", "memory", "train"}),  # anything but cli
}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    path: str  # the importing file, relative to the folder holding the package
    line: int
    lazy: bool  # inside a function

    def where(self) -> str:
        return f"{self.path}:{self.line}{' (lazy)' if self.lazy else ''}"

    def __repr__(self) -> str:
        return f"{self.source} -> {self.target} [{self.where()}]"


@dataclass
class Graph:
    package: Path  # the package folder
    modules: dict[str, Path]  # dotted name -> file
    edges: list[Edge]  # one per importing statement and imported module

    def __repr__(self) -> str:
        return f"Graph({self.package}: {len(self.modules)} modules, {len(self.edges)} edges)"


def module_names(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `package` (a folder's __init__.py is the package)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = (package.name, *path.relative_to(package).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path], top: str) -> list[tuple[str, int, bool]]:
    """(target module, line, lazy) for every import of a `top` module in the file `path` of module `name`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    lazy = {id(node) for func in ast.walk(tree) if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(func)}
    is_package = path.name == "__init__.py"
    found: list[tuple[str, int, bool]] = []

    def add(target: str, node: ast.AST) -> None:
        if target == top or target.startswith(top + "."):
            found.append((target, node.lineno, id(node) in lazy))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative to the package holding this module (a package's __init__ is in itself)
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join([*base, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                add(submodule if submodule in modules else origin, node)
        elif isinstance(node, ast.Call):  # importlib.import_module("peftkit.x") with a literal name
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if (called == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                add(node.args[0].value, node)
    return found


def build_graph(package: Path) -> Graph:
    modules = module_names(package)
    edges: dict[tuple[str, str, int], Edge] = {}  # `from x import a, b` is one edge when a and b are not modules
    for name, path in modules.items():
        rel = str(path.relative_to(package.parent))
        for target, line, lazy in imports_of(name, path, modules, package.name):
            if target != name:
                edges.setdefault((name, target, line), Edge(name, target, rel, line, lazy))
    return Graph(package, modules, list(edges.values()))


def strongly_connected(nodes: list[str], out: dict[str, dict[str, Edge]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in out[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in nodes:
        if node not in index:
            visit(node)
    return sorted(components)


def shortest_cycle(start: str, inside: set[str], out: dict[str, dict[str, Edge]]) -> list[Edge]:
    """The shortest cycle start -> ... -> start within `inside` (breadth first), as its edges."""
    parent: dict[str, Edge] = {}
    frontier = [start]
    while start not in parent:
        following = []
        for node in frontier:
            for nxt, edge in sorted(out[node].items()):
                if nxt in inside and nxt not in parent:
                    parent[nxt] = edge
                    following.append(nxt)
        frontier = following
    path = [parent[start]]
    while path[-1].source != start:
        path.append(parent[path[-1].source])
    return path[::-1]


def find_cycles(nodes: list[str], edges: list[Edge]) -> list[tuple[list[str], list[list[Edge]]]]:
    """Per group of modules that import each other (a strongly connected component): its modules, and the
    distinct shortest cycles through each of them."""
    out: dict[str, dict[str, Edge]] = {n: {} for n in nodes}
    for edge in edges:
        out.setdefault(edge.target, {})
        out.setdefault(edge.source, {}).setdefault(edge.target, edge)
    groups = []
    for component in strongly_connected(sorted(out), out):
        cycles: dict[frozenset[tuple[str, str]], list[Edge]] = {}
        for start in component:
            cycle = shortest_cycle(start, set(component), out)
            cycles.setdefault(frozenset((e.source, e.target) for e in cycle), cycle)
        groups.append((component, sorted(cycles.values(), key=len)))
    return groups


def layer_of(module: str) -> str | None:
    """The layer table key of `module` (longest prefix), None when no layer holds it."""
    if module == "peftkit":
        return "peftkit"
    keys = [k for k in LAYERS if k != "peftkit" and (module == k or module.startswith(k + "."))]
    return max(keys, key=len) if keys else None


def layering_violations(graph: Graph) -> list[str]:
    problems = [f"{graph.modules[m].relative_to(graph.package.parent)}: module {m} is in no layer of the table"
                for m in graph.modules if layer_of(m) is None]
    for edge in graph.edges:
        source = layer_of(edge.source)
        if source is None or LAYERS[source] is ANY:
            continue
        allowed = {f"peftkit.{short}" for short in LAYERS[source]}
        target = layer_of(edge.target)
        if target not in allowed:
            problems.append(f"{edge.where()}: {edge.source} (layer {source}) imports {edge.target} "
                            f"(layer {target or 'none'}); {source} may import only: "
                            f"{', '.join(sorted(LAYERS[source])) or 'nothing of peftkit'}")
    return problems


def _package_dir() -> Path:
    """The folder of the peftkit this session imports (the checkout holding these tests: pytest's 'prepend' import
    mode puts its root first on sys.path), found without importing it."""
    spec = importlib.util.find_spec("peftkit")
    assert spec is not None and spec.submodule_search_locations, "peftkit is not importable"
    return Path(next(iter(spec.submodule_search_locations))).resolve()


@pytest.fixture(scope="module")
def graph() -> Graph:
    return build_graph(_package_dir())


def test_graph_is_found(graph):
    assert {"peftkit", "peftkit.errors", "peftkit.core"} <= set(graph.modules), sorted(graph.modules)
    assert any(e.source == "peftkit" and e.target == "peftkit.errors" for e in graph.edges)


def test_no_import_cycle(graph):
    groups = find_cycles(sorted(graph.modules), graph.edges)
    report = []
    for modules, cycles in groups:
        report.append(f"{len(modules)} modules import each other: {', '.join(modules)}; shortest cycles:")
        report += ["    " + " -> ".join([c[0].source, *(f"{e.target} [{e.where()}]" for e in c)]) for c in cycles]
    assert not groups, "import cycles (lazy imports included):\n  " + "\n  ".join(report)


def test_imports_follow_the_layers(graph):
    problems = layering_violations(graph)
    assert not problems, f"{len(problems)} layering violation(s):\n  " + "\n  ".join(problems)


def test_package_root_has_at_most_10_modules(graph):
    root = sorted(p.name for p in graph.package.glob("*.py"))
    assert len(root) <= ROOT_MODULES_MAX, (
        f"{graph.package} has {len(root)} modules at its root (at most {ROOT_MODULES_MAX}): {', '.join(root)}")


def test_no_module_over_300_lines(graph):
    sizes = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in graph.modules.items()}
    long = sorted(((n, m) for m, n in sizes.items() if n > MODULE_LINES_MAX), reverse=True)
    assert not long, f"{len(long)} module(s) over {MODULE_LINES_MAX} lines:\n  " + "\n  ".join(
        f"{graph.modules[m].relative_to(graph.package.parent)}: {n} lines" for n, m in long)


# The checker itself, on a small synthetic package.

def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "peftkit" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "peftkit"


def test_checker_edges_cycles_and_layers(tmp_path):
    package = _write(tmp_path, {
        "__init__.py": "from peftkit.core import ops\nfrom peftkit.errors import Err\n",
        "errors.py": "class Err(Exception):\n    pass\n",
        "core/__init__.py": "",
        "core/ops.py": "import peftkit.core.state as s\nfrom . import inject\n\n"
                       "def f():\n    from peftkit.io import adapters\n",
        "core/state.py": "from ..errors import Err\nfrom .ops import f\n",
        "core/inject.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from peftkit.cli import main\n",
        "io/__init__.py": "import importlib\nimportlib.import_module('peftkit.core.state')\n",
        "io/adapters.py": "from peftkit.io import nothing_here\n",
        "extra.py": "",
        "cli/__init__.py": "import peftkit\nfrom peftkit.io.adapters import *\n",
    })
    g = build_graph(package)
    edges = {(e.source, e.target, e.lazy) for e in g.edges}
    assert edges == {
        ("peftkit", "peftkit.core.ops", False), ("peftkit", "peftkit.errors", False),
        ("peftkit.core.ops", "peftkit.core.state", False), ("peftkit.core.ops", "peftkit.core.inject", False),
        ("peftkit.core.ops", "peftkit.io.adapters", True),
        ("peftkit.core.state", "peftkit.errors", False), ("peftkit.core.state", "peftkit.core.ops", False),
        ("peftkit.core.inject", "peftkit.cli", False), ("peftkit.io", "peftkit.core.state", False),
        ("peftkit.io.adapters", "peftkit.io", False),
        ("peftkit.cli", "peftkit", False), ("peftkit.cli", "peftkit.io.adapters", False),
    }
    [(modules, cycles)] = find_cycles(sorted(g.modules), g.edges)
    assert modules == ["peftkit", "peftkit.cli", "peftkit.core.inject", "peftkit.core.ops", "peftkit.core.state",
                       "peftkit.io", "peftkit.io.adapters"]
    assert [[(e.source, e.target) for e in c] for c in cycles] == [
        [("peftkit.core.ops", "peftkit.core.state"), ("peftkit.core.state", "peftkit.core.ops")],
        [("peftkit", "peftkit.core.ops"), ("peftkit.core.ops", "peftkit.core.inject"),
         ("peftkit.core.inject", "peftkit.cli"), ("peftkit.cli", "peftkit")],
        [("peftkit.io", "peftkit.core.state"), ("peftkit.core.state", "peftkit.core.ops"),
         ("peftkit.core.ops", "peftkit.io.adapters"), ("peftkit.io.adapters", "peftkit.io")],
    ]
    problems = layering_violations(g)
    assert len(problems) == 3, problems
    assert problems[0] == "peftkit/extra.py: module peftkit.extra is in no layer of the table"
    assert ("peftkit/core/ops.py:5 (lazy): peftkit.core.ops (layer peftkit.core) imports peftkit.io.adapters "
            "(layer peftkit.io); peftkit.core may import only: _version, core, errors") in problems
    assert any(p.startswith("peftkit/core/inject.py:3: peftkit.core.inject (layer peftkit.core) imports peftkit.cli")
               for p in problems)
