"""GRPO's reward functions: the built-ins and a user's `module:function`, with TRL's signature

    reward(prompts: list, completions: list[str], **columns) -> list[float]

(`columns`: the data's other columns, one value per completion, plus `completion_ids`). `--reward NAME[:weight]`,
repeatable; a spec whose part after the last ":" is a number has a weight (default 1.0), so `fields`,
`fields:0.5`, `my_rewards:score` and `my_rewards:score:2` all work. A `module:function` is imported from the
working folder or the Python path (`path/to/file.py:function` loads that file): code the user chose to run.

Built-ins (no torch here):
    exact_match  1 when the completion, stripped, equals the `answer` column, stripped (exact match's rule)
    fields       the answer's `key=value` fields (separated by ";"; the bundled extraction task's name, city, date):
                 the share the completion writes in their slot (the same key=value, stripped). A value elsewhere
                 earns nothing: credit for it paid the policy for echoing the input sentence, which names the
                 person and the city (docs/training.md, "GRPO on the bundled task")
    format       1 when the whole stripped completion matches --reward-pattern (Python regex, fullmatch)
    length       -(completion tokens / max_completion_length): a length penalty in [-1, 0]

A reward that raises, returns the wrong number of values, or a value that is not a finite number stops the run
with one line naming it.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError

RewardFunction = Callable[..., list[float]]
NEEDS_ANSWER = ("exact_match", "fields")
# The bundled task's answer line: name=...; city=...; date=YYYY-MM-DD
DEFAULT_PATTERN = r"name=[^;\n]+; city=[^;\n]+; date=\d{4}-\d{2}-\d{2}"


def exact_match(prompts: list, completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """1.0 where the stripped completion equals the stripped answer."""
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer, strict=True)]


def fields(prompts: list, completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """Per completion, the share of the answer's `key=value` fields it writes in their slot (the same key, the
    same stripped value)."""
    return [_field_share(c, str(a)) for c, a in zip(completions, answer, strict=True)]


def _pairs(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.strip().split(";"):
        key, sep, value = part.partition("=")
        if sep:
            out.setdefault(key.strip(), value.strip())
    return out


def _field_share(completion: str, answer: str) -> float:
    want = _pairs(answer)
    got = _pairs(completion)
    if not want:
        return 0.0
    return sum(got.get(k) == v for k, v in want.items()) / len(want)


def format_reward(pattern: str) -> RewardFunction:
    """1.0 where the whole stripped completion matches `pattern`."""
    compiled = re.compile(pattern)

    def format(prompts: list, completions: list[str], **_: Any) -> list[float]:
        return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]

    return format


def length_penalty(max_completion_length: int) -> RewardFunction:
    """-(completion tokens / max_completion_length)."""
    def length(prompts: list, completions: list[str], completion_ids: list[list[int]], **_: Any) -> list[float]:
        return [-len(ids) / max_completion_length for ids in completion_ids]

    return length


@dataclass(frozen=True)
class Reward:
    """One reward function with its weight and the name its metrics carry."""

    name: str
    weight: float
    function: RewardFunction
    needs_answer: bool = False

    def __call__(self, prompts: list, completions: list[str], columns: dict[str, list]) -> list[float]:
        """The checked rewards of `completions` (see the module docstring)."""
        try:
            values = self.function(prompts=prompts, completions=completions, **columns)
        except Exception as exc:  # noqa: BLE001  (a user's function may raise anything: say which one)
            raise PeftkitError(f"the reward {self.name!r} raised {type(exc).__name__}: {exc}") from None
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise PeftkitError(f"the reward {self.name!r} returned {got} for {len(completions)} completions; "
                               f"return a list with one float per completion")
        for i, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise PeftkitError(f"the reward {self.name!r} returned {value!r} for completion {i}; return a "
                                   f"finite float for every completion")
        return [float(v) for v in values]


def parse(spec: str) -> tuple[str, float]:
    """('name or module:function', weight) of one --reward value."""
    head, sep, tail = spec.strip().rpartition(":")
    if sep and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", tail.strip()):
        return head, float(tail)
    return spec.strip(), 1.0


def build(specs: list[str], pattern: str, max_completion_length: int) -> list[Reward]:
    """The reward functions of the --reward values."""
    builtins: dict[str, RewardFunction] = {"exact_match": exact_match, "fields": fields,
                                           "format": format_reward(pattern),
                                           "length": length_penalty(max_completion_length)}
    out = []
    for spec in specs:
        name, weight = parse(spec)
        if name in builtins:
            out.append(Reward(name, weight, builtins[name], name in NEEDS_ANSWER))
        elif ":" in name:
            out.append(Reward(name, weight, load_function(name)))
        else:
            raise PeftkitError(f"--reward {spec!r}: not a built-in reward ({', '.join(builtins)}) nor a "
                               f"module:function")
    return out


def load_function(target: str) -> RewardFunction:
    """The function `module:function` (or `file.py:function`), imported from the working folder or sys.path."""
    module_name, _, attr = target.rpartition(":")
    try:
        if module_name.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load {module_name}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001  (importing user code may raise anything)
        raise PeftkitError(f"--reward {target}: could not import {module_name!r} ({type(exc).__name__}: {exc})") \
            from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise PeftkitError(f"--reward {target}: {module_name!r} has no function {attr!r}")
    return function
