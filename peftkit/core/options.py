"""`Option`: one user-facing option, declared once, from which the CLI, recipe validation, `--set`, `--print-config`
and the docs' options table are all generated.

An option says its name (the recipe key, snake_case), its type, default, bounds or choices, help text, CLI flags
and the names other tools give it in their recipes (LLaMA-Factory, axolotl, TRL / HF TrainingArguments). The
trainer's own options are declared on `TrainConfig`'s fields (`option(...)`, which puts the Option in the field's
metadata; `declared_options(TrainConfig)` reads them back with name and type filled in); the options several methods
share are declared in `core/method_options.py` (`declare(RANK)` on the field), and a method maps the ones it reads
to its config fields (`Method.option_fields`, e.g. LoRA's `rank` -> `r`). Options declared elsewhere (e.g. per
objective) join through `train.config.EXTRA_OPTIONS`.

`Option.check(value)` is the one validation: it coerces (`"1e-4"` -> 1e-4 from YAML 1.1 or `--set`, `3.0` -> 3)
and bounds the value, with one error line naming the option, whichever way the value arrived (flag, `--set`,
recipe, Python). No torch here: everything is checked before a model loads.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from peftkit.errors import PeftkitError


@dataclass(frozen=True)
class Option:
    """One option. `kind` is the value's type (int, float, bool, str, dict or list), or a tuple of them tried in
    order (`(int, float, str)`: "0.1" is a number, "validation" text); `default` None means "unset: the default for
    this run is resolved later" (so None is then an allowed value).

    Bounds: `low` / `high` (inclusive unless `low_open` / `high_open`). `choices`: the allowed values of a str
    option. `flags`: CLI spellings (default: `--name-with-dashes`; a bool option gets `--x/--no-x`). `aliases`:
    other tools' recipe keys with the same meaning. `field`: the config field it sets in a method's or objective's
    config (default: `name`). `cli=False` keeps it out of the command line (recipe and `--set` only).
    `multiple`: the flag may be repeated; the values are joined with "," (a str option) or read as
    `key=value,key=value` pairs (a dict option), so `--data a --data b` is `data: a,b`.
    """

    name: str
    kind: type | tuple[type, ...]
    default: Any = None
    help: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    field: str | None = None
    cli: bool = True
    multiple: bool = False

    @property
    def target(self) -> str:
        """The config field this option sets."""
        return self.field or self.name

    @property
    def cli_flags(self) -> tuple[str, ...]:
        """The flags spelled on the command line (`--name-with-dashes` unless declared; a bool option's default is
        the pair `--name/--no-name`)."""
        if self.flags:
            return self.flags
        dashed = self.name.replace("_", "-")
        return (f"--{dashed}/--no-{dashed}",) if self.kind is bool else (f"--{dashed}",)

    def spelled(self, value: Any) -> str:
        """The flag as typed for `value`: `--rank`, `--packing`, `--no-packing` (False)."""
        on, _, off = self.cli_flags[0].partition("/")
        return off if off and value is False else on

    @property
    def kinds(self) -> tuple[type, ...]:
        """The value's types, in the order a text value is tried."""
        return self.kind if isinstance(self.kind, tuple) else (self.kind,)

    def check(self, value: Any, required: bool = False) -> Any:
        """`value` coerced to this option's type, bounded; PeftkitError (one line naming the option) otherwise.
        None passes when the option's default is None, unless `required` (a method config's field needs a value)."""
        if value is None:
            if self.default is None and not required:
                return None
            raise PeftkitError(f"{self.name} needs a value")
        value = coerce(self.name, value, self.kind)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            self._check_bounds(value)
        if self.choices and value not in self.choices:
            raise PeftkitError(f"{self.name} must be one of {', '.join(self.choices)}; got {value!r}")
        return value

    def _check_bounds(self, value: float) -> None:
        if isinstance(value, float) and not math.isfinite(value):  # an int always is (10**400 has no float)
            raise PeftkitError(f"{self.name} must be a finite number, got {value!r}")
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        if not (low_ok and high_ok):
            raise PeftkitError(f"{self.name} must be {self.describe_bounds()}, got {value!r}")

    def describe_bounds(self) -> str:
        """'>= 1 and <= 65,536', '> 0', ... (empty when unbounded)."""
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {_num(self.low)}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {_num(self.high)}")
        return " and ".join(parts)


def coerce(name: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    """`value` as `kind` (int, float, bool, str, dict, list, or a tuple of them tried in order), or PeftkitError
    naming `name`.

    Strings from YAML 1.1 recipes or `--set` are read as numbers where the type wants one ("1e-4", "8"); a float
    that is whole becomes an int where an int is wanted; True is never the number 1; "true" / "false" are bools.
    """
    for one in kind if isinstance(kind, tuple) else (kind,):
        converted = _convert(value, one)
        if converted is not _NO:
            return converted
    raise PeftkitError(f"{name} must be {describe_kind(kind)}, got {value!r}")


def describe_kind(kind: type | tuple[type, ...]) -> str:
    """How an error names a type: 'a whole number', 'a number', 'a number or text', ..."""
    if isinstance(kind, tuple):
        return " or ".join(describe_kind(one) for one in kind)
    return {int: "a whole number", float: "a number", bool: "true or false", str: "text",
            dict: "a mapping of key: value", list: "a list", tuple: "a list",
            type(None): "nothing"}.get(kind, getattr(kind, "__name__", str(kind)))


def kinds_of(hint: Any) -> tuple[type, ...]:
    """The kinds `coerce` tries for a type hint, strictest first: `int | None` -> (NoneType, int); `tuple[str, ...]
    | str | None` -> (NoneType, tuple, str); a number before text, so "4" is 4 where both are allowed."""
    members = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    kinds = {typing.get_origin(m) or m for m in members}
    order = (type(None), bool, int, float, dict, list, tuple, str)
    return tuple(k for k in order if k in kinds) + tuple(k for k in kinds if k not in order)


def option(default: Any = None, *, kind: type | tuple[type, ...] | None = None, default_factory: Any = None,
           **declared: Any) -> Any:
    """A dataclass field carrying its `Option` (metadata "option"); the option's name is the field's, its kind the
    field's annotated type unless given (see `declared_options`). `option(None, help=..., low=0)`."""
    spec = Option("", kind or object, default=default if default_factory is None else default_factory(), **declared)
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata={"option": spec})
    return dataclasses.field(default=default, metadata={"option": spec})


def declare(spec: Option) -> Any:
    """A dataclass field for an option declared elsewhere (the shared method options: `rank: int | None =
    declare(RANK)`), defaulting to the option's default."""
    return dataclasses.field(default=spec.default, metadata={"option": spec})


def declared_options(cls: type) -> dict[str, Option]:
    """name -> Option for every field of dataclass `cls` declared with `option()` (or with an `Option` as its
    metadata), name and kind filled in from the field."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("option")
        if spec is None:
            continue
        kind = spec.kind
        if kind is object:
            kind = tuple(k for k in kinds_of(hints[f.name]) if k is not type(None))
            kind = kind[0] if len(kind) == 1 else kind
        out[f.name] = dataclasses.replace(spec, name=spec.name or f.name, kind=kind)
    return out


_NO = object()


def _num(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


def _convert(value: Any, kind: type) -> Any:
    """`value` as `kind`, or _NO when it is not one."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = value.strip().lower() if isinstance(value, str) else None
        return {"true": True, "false": False}.get(text, _NO) if text is not None else _NO
    if isinstance(value, bool):
        return _NO  # True is not the number 1 here
    if kind is int:
        return _to_int(value)
    if kind is float:
        return _to_float(value)
    if kind is str:
        return value if isinstance(value, str) else _NO
    if kind is type(None):
        return None if value is None else _NO
    if kind is dict:
        return value if isinstance(value, dict) else _NO
    if kind in (list, tuple):
        return value if isinstance(value, (list, tuple)) else _NO
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
