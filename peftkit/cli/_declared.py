"""typer options generated from `Option` declarations (peftkit/core/options.py), so a command's flags, their help
and types are the declarations' (`peftkit train` builds its whole signature here; `estimate` and `inspect` take
the shared method options).

    Rank = annotated(RANK)                                      # a parameter annotation: `rank: Rank = None`
    train_cmd.__signature__ = signature(options, before, after) # a generic `def train_cmd(**values)`
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import Annotated, Any

import typer

from peftkit.core.options import Option
from peftkit.errors import PeftkitError

_TYPES: dict[type, type] = {int: int, float: float, bool: bool, str: str}


def annotated(option: Option, help: str | None = None) -> Any:
    """`Annotated[type | None, typer.Option(flags..., help=...)]` for `option` (a repeatable option takes a list;
    a bool with a `--x/--no-x` pair is `bool | None`, a plain switch `bool`)."""
    kind = _TYPES.get(option.kind, str) if not isinstance(option.kind, tuple) else str
    if option.multiple:
        kind = list[str]
    hint = bool if is_switch(option) else kind | None
    return Annotated[hint, typer.Option(*option.cli_flags, help=help or option.help)]


def is_switch(option: Option) -> bool:
    """A bool option spelled without a `--no-` form (`--overwrite`): given or not, default False."""
    return option.kind is bool and "/" not in option.cli_flags[0]


def parameter(option: Option) -> inspect.Parameter:
    """The keyword parameter of a generated command for `option` (default None: "not given"; a switch False)."""
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotated(option),
                             default=False if is_switch(option) else None)


def signature(options: Iterable[Option], before: Sequence[inspect.Parameter] = (),
              after: Sequence[inspect.Parameter] = ()) -> inspect.Signature:
    """A command signature: `before`, one parameter per CLI option (declarations with `cli=False` left out), then
    `after` (the command's own parameters, e.g. `--config`)."""
    generated = [parameter(o) for o in options if o.cli]
    return inspect.Signature([*before, *generated, *after])


def given(options: Iterable[Option], values: dict[str, Any]) -> dict[str, Any]:
    """The flag values of a generated command by option name, None where not given: repeated values joined (a str
    option: "a,b") or read as pairs (a dict option: `a=b,c=d` -> {"a": "b", "c": "d"}), a switch left off None."""
    out: dict[str, Any] = {}
    for option in options:
        if not option.cli or option.name not in values:
            continue
        value = values[option.name]
        if option.multiple:
            value = pairs(option.cli_flags[0], value) or None if option.kind is dict else ",".join(value or []) or None
        elif is_switch(option):
            value = value or None
        out[option.name] = value
    return out


def pairs(flag: str, values: list[str] | None) -> dict[str, str]:
    """{"instruction": "question", ...} from ["instruction=question,output=answer", ...]."""
    out: dict[str, str] = {}
    for pair in (part for value in values or [] for part in value.split(",") if part.strip()):
        ours, sep, theirs = pair.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise PeftkitError(f"{flag} expects peftkit_name=dataset_column pairs, e.g. instruction=question; "
                               f"got {pair!r}")
        out[ours.strip()] = theirs.strip()
    return out
