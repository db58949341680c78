"""No objective name is compared outside the objective's own module: the trainer asks the objective (its
`Objective` attributes and methods) instead of testing which one it is, so a new objective is one file.

Every module under peftkit/ is parsed with `ast`. A registered objective's name (a string constant) is flagged
when it is an operand of == / != / is / is not, an element of a literal tuple / list / set that is compared or
searched with `in` / `not in`, or a key of a literal dict, anywhere but in the file that registers that objective.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import peftkit
from peftkit.train.objectives.base import get_objective, objective_names

PACKAGE = Path(peftkit.__file__).parent


def _owners() -> dict[str, Path]:
    """Objective name -> the file that registers it (where its class is defined)."""
    return {name: Path(inspect.getfile(type(get_objective(name)))).resolve() for name in objective_names()}


def _constants(node: ast.AST) -> list[ast.Constant]:
    """String constants that are the node itself or the elements of a literal tuple / list / set."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [e for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return []


def compared_names(tree: ast.AST, names: set[str]) -> list[tuple[str, int]]:
    """(name, line) of every objective name compared, searched for or used as a dict key in `tree`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                found += [(c.value, c.lineno) for c in _constants(operand) if c.value in names]
        elif isinstance(node, ast.Dict):
            found += [(k.value, k.lineno) for k in node.keys
                      if isinstance(k, ast.Constant) and isinstance(k.value, str) and k.value in names]
    return found


def test_no_objective_name_is_compared_outside_its_module():
    owners = _owners()
    names = set(owners)
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for name, line in compared_names(ast.parse(path.read_text(encoding="utf-8")), names):
            if path.resolve() != owners[name]:
                offences.append(f"{path.relative_to(PACKAGE.parent)}:{line} compares {name!r}")
    assert not offences, "ask the objective instead of comparing its name:\n  " + "\n  ".join(offences)


def test_the_check_finds_each_kind_of_comparison():
    source = ('a == "dpo"\nif x != "sft": pass\nif y in ("orpo", "z"): pass\nb = {"simpo": 1}\nc = "kto" if d else e\n'
              'f = cfg.objective\n')
    found = compared_names(ast.parse(source), {"dpo", "sft", "orpo", "simpo", "kto"})
    assert found == [("dpo", 1), ("sft", 2), ("orpo", 3), ("simpo", 4)]
    assert {"sft", "dpo", "orpo", "simpo", "kto"} <= set(objective_names())
