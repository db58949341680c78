"""Type coercion and bounds for `TrainConfig`: the one schema that flags and recipes go through before anything
is loaded or written.

Values arrive from typer (already typed), from YAML recipes (YAML 1.1 reads `1e-4` as a string, `seed: abc` is a
string, `model: 123` an int) and from Python callers. Each field is coerced to its annotated type where that is
unambiguous (`"1e-4"` -> 1e-4, `3.0` -> 3) and refused otherwise with one line naming the field; numbers must be
finite and inside the bounds below, which keep absurd values (`--lr inf`, `--max-length 1e23`) from reaching torch.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any

from peftkit.errors import PeftkitError

BIG = 1 << 40
# field -> (lowest, highest, lowest allowed itself?)
BOUNDS: dict[str, tuple[float, float, bool]] = {
    "rank": (1, 1 << 16, True),
    "alpha": (0, 1e6, False),
    "dropout": (0, 1, True),
    "reduction_factor": (1, 1 << 16, True),
    "num_virtual_tokens": (1, 1 << 16, True),
    "eval_examples": (0, 1 << 31, True),
    "max_length": (2, 1 << 24, True),
    "lr": (0, 10, False),
    "epochs": (0, 1e6, False),
    "max_steps": (1, BIG, True),
    "batch_size": (1, 1 << 20, True),
    "grad_accum": (1, 1 << 20, True),
    "warmup": (0, BIG, True),
    "weight_decay": (0, 10, True),
    "max_grad_norm": (0, 1e9, True),
    "loraplus_lr_ratio": (0, 1e6, False),
    "seed": (0, 2**32 - 1, True),
    "save_steps": (1, BIG, True),
    "eval_steps": (1, BIG, True),
    "keep_checkpoints": (1, 1 << 20, True),
    "batch_tokens": (2, 1 << 30, True),
}
OPEN_ABOVE = {"dropout"}  # [0, 1): a dropout of 1 drops everything


def coerce_fields(config: Any) -> None:
    """Coerce every field of the dataclass `config` to its annotated type, in place, then check the bounds."""
    hints = typing.get_type_hints(type(config))
    for name, hint in hints.items():
        value = getattr(config, name)
        value = coerce(name, value, hint)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and name in BOUNDS:
            check_bounds(name, value)
        object.__setattr__(config, name, value)


def coerce(name: str, value: Any, hint: Any) -> Any:
    """`value` as type `hint` (int, float, bool, str, dict, or unions of those with None)."""
    options = _union_members(hint)
    if value is None:
        if type(None) in options:
            return None
        raise PeftkitError(f"{name} needs a value")
    kinds = [k for k in options if k is not type(None)]
    for kind in sorted(kinds, key=_preference):
        converted = _convert(value, kind)
        if converted is not _NO:
            return converted
    wanted = " or ".join(_describe(k) for k in kinds)
    raise PeftkitError(f"{name} must be {wanted}, got {value!r}")


def check_bounds(name: str, value: float) -> None:
    """A finite number inside BOUNDS[name]."""
    if not math.isfinite(value):
        raise PeftkitError(f"{name} must be a finite number, got {value!r}")
    low, high, low_ok = BOUNDS[name]
    above_low = value >= low if low_ok else value > low
    below_high = value < high if name in OPEN_ABOVE else value <= high
    if not (above_low and below_high):
        low_text = f">= {_num(low)}" if low_ok else f"> {_num(low)}"
        high_text = f"< {_num(high)}" if name in OPEN_ABOVE else f"<= {_num(high)}"
        raise PeftkitError(f"{name} must be {low_text} and {high_text}, got {value!r}")


_NO = object()


def _num(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


def _union_members(hint: Any) -> tuple:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (typing.get_origin(hint) or hint,)


def _preference(kind: Any) -> int:
    """Try the strictest reading first: a number before text ("0.1" as eval_split is a share, not a split name)."""
    return {bool: 0, int: 1, float: 2, dict: 3, str: 4}.get(kind, 5)


def _convert(value: Any, kind: Any) -> Any:
    """`value` as `kind`, or _NO when it is not one."""
    if kind is bool:
        return value if isinstance(value, bool) else _NO
    if isinstance(value, bool):
        return _NO  # True is not the number 1 here
    if kind is int:
        return _to_int(value)
    if kind is float:
        return _to_float(value)
    if kind is str:
        return value if isinstance(value, str) else _NO
    if kind is dict:
        return value if isinstance(value, dict) else _NO
    return value


def _to_float(value: Any) -> Any:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return _NO
    return _NO


def _to_int(value: Any) -> Any:
    if isinstance(value, int):
        return value
    number = _to_float(value)
    if number is _NO or not math.isfinite(number) or not float(number).is_integer():
        return _NO
    return int(number)


def _describe(kind: Any) -> str:
    return {int: "a whole number", float: "a number", bool: "true or false", str: "text",
            dict: "a mapping of key: value"}.get(kind, str(kind))
