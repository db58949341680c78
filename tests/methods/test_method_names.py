"""No method name is compared outside its own module: code outside a method asks the method (its `Method` hooks),
so adding a method (a plugin included) never means editing the trainer, the estimator or the CLI.

Every file under peftkit/ is parsed with `ast`. A registered method's name, as a string literal, is a violation
outside that method's own module (its file, or its folder for a method that is a package such as methods/lora/)
when it is
- compared: `X == "lora"`, `X != "lora"`, `X in ("lora", "qlora")` (a literal tuple / list / set), where X is
  method-like: a name or attribute called `method...` / `name`, a subscript `[...]["method"]`, or a variable
  bound by iterating the registry (`for m in method_names()`);
- a key or member of a literal container bound to a method-like name: `METHODS = ("full", ...)`, `METHOD_OPTIONS = {"r":
  ("lora",)}`, or of a literal dict indexed by a method-like value: `{"lora": 1}[method]`, `{...}.get(method)`;
- iterated as a literal into a method-like loop variable: `for method in ("lora", "qlora")`.
Restricting to method-like operands keeps ordinary words out: a `"prompt"` column, the `"full"` loss path, the
recipe key `"adapter"` are not method names there. A default (`method: str = "lora"`) picks a method without
knowing anything about it, so a name bound alone is allowed. Text (help strings, docstrings, log lines) is not a comparison
and is allowed. The checker itself is tested on small snippets, so a rule that stopped matching would fail here.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from peftkit.core.registry import get_method, method_names

PACKAGE = Path(__file__).resolve().parents[2] / "peftkit"
METHOD_LIKE = re.compile(r"method", re.IGNORECASE)
CONTAINERS = (ast.Tuple, ast.List, ast.Set, ast.Dict)


def is_method_like(node: ast.AST, loop_names: frozenset[str] = frozenset()) -> bool:
    """Whether `node` names a method: `method`, `cfg.method`, `method_name`, `name`, `m.name`, `meta["method"]`, or
    a variable in `loop_names` (bound by `for m in method_names()`)."""
    if isinstance(node, ast.Name):
        return bool(METHOD_LIKE.search(node.id)) or node.id == "name" or node.id in loop_names
    if isinstance(node, ast.Attribute):
        return bool(METHOD_LIKE.search(node.attr)) or node.attr == "name"
    if isinstance(node, ast.Subscript):
        key = node.slice
        return isinstance(key, ast.Constant) and isinstance(key.value, str) and bool(METHOD_LIKE.search(key.value))
    return False


def literals(node: ast.AST | None, names: set[str]) -> list[ast.Constant]:
    """The string constants under `node` that are method names."""
    if node is None:
        return []
    return [n for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in names]


def _compared(node: ast.Compare, names: set[str], loop_names: frozenset[str]) -> list[ast.Constant]:
    found = []
    operands = [node.left, *node.comparators]
    for left, op, right in zip(operands[:-1], node.ops, operands[1:], strict=True):
        if isinstance(op, (ast.Eq, ast.NotEq)):
            for a, b in ((left, right), (right, left)):
                if is_method_like(a, loop_names) and isinstance(b, ast.Constant) and b.value in names:
                    found.append(b)
        elif isinstance(op, (ast.In, ast.NotIn)) and is_method_like(left, loop_names) and isinstance(right, CONTAINERS[:3]):
            found += literals(right, names)
    return found


def _bound(node: ast.AST, names: set[str]) -> list[ast.Constant]:
    """Literals bound to a method-like name, indexed by a method-like value, or iterated into a method-like target."""
    if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, CONTAINERS):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return literals(node.value, names) if any(is_method_like(t) for t in targets) else []
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Dict) and is_method_like(node.slice):
        return literals(node.value, names)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
            and isinstance(node.func.value, ast.Dict) and node.args and is_method_like(node.args[0])):
        return literals(node.func.value, names)
    if isinstance(node, (ast.For, ast.comprehension)) and is_method_like(node.target):
        return literals(node.iter, names) if isinstance(node.iter, CONTAINERS[:3]) else []
    return []


def registry_loop_names(tree: ast.AST) -> frozenset[str]:
    """Variables bound by iterating the registry: `for m in method_names()` (and comprehensions)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.For, ast.comprehension)) and isinstance(node.target, ast.Name):
            call = node.iter.func if isinstance(node.iter, ast.Call) else None
            if getattr(call, "id", getattr(call, "attr", None)) == "method_names":
                out.add(node.target.id)
    return frozenset(out)


def violations(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) for every method name used as a method name in `source` (the rules of the module docstring)."""
    tree = ast.parse(source)
    loop_names = registry_loop_names(tree)
    found: list[ast.Constant] = []
    for node in ast.walk(tree):
        found += _compared(node, names, loop_names) if isinstance(node, ast.Compare) else []
        found += _bound(node, names)
    return sorted({(c.lineno, c.value) for c in found})


def own_places() -> dict[str, Path]:
    """Method name -> its own module: the file defining its Method class, or that file's folder for a package
    below peftkit/methods/ (methods/lora/, methods/bottleneck/)."""
    places = {}
    for name in method_names():
        path = Path(sys.modules[type(get_method(name)).__module__].__file__).resolve()
        places[name] = path.parent if path.parent != PACKAGE / "methods" and PACKAGE in path.parents else path
    return places


def test_no_method_name_is_compared_outside_its_own_module():
    places = own_places()
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, name in violations(path.read_text(encoding="utf-8"), set(places)):
            own = places[name]
            if path != own and own not in path.parents:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name!r} (ask the method instead)")
    assert not bad, "method names used outside their methods:\n" + "\n".join(bad)


@pytest.mark.parametrize("source", [
    'if setup.method == "lora": pass',
    'if "prefix" != cfg.method_name: pass',
    'x = method in ("full", "freeze")',
    'x = name not in ["prompt"]',
    'METHODS = ("full", "lora")',
    'METHOD_OPTIONS = {"r": ("lora", "qlora")}',
    'x = {"adapter": 2}[setup.method]',
    'x = {"adapter": 2}.get(method, 0)',
    'x = [m for method in ("lora", "qlora")]',
    'ok = meta["method"] == "qlora"',
    'x = [m for m in method_names() if m != "lora"]',
])
def test_checker_flags_method_names(source):
    assert violations(source, {"full", "freeze", "lora", "qlora", "adapter", "prefix", "prompt"})


@pytest.mark.parametrize("source", [
    'if "prompt" in columns: pass',
    'LOSS_PATHS = ("fused", "keep", "full")',
    'if path != "full": pass',
    'ALIASES = {"adapter": "method"}',
    'help = "full | freeze | lora"',
    'if method.trains_base: pass',
    'method: str = "lora"',
])
def test_checker_leaves_plain_words_alone(source):
    assert violations(source, {"full", "freeze", "lora", "qlora", "adapter", "prefix", "prompt"}) == []
