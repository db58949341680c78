"""The New-run form's server side: the form's fields, and what the page shows before launch.

Everything here goes through the code the CLI runs, so the page cannot drift from `peftkit train`:
- the fields are the options `peftkit train` has flags for (`cli.train.command_options`: the one declaration of
  each option), with their help, type, default, bounds and choices;
- a filled form is turned into the flags of that command (`flag_values`), read by `train.config.load_sourced` (the
  CLI's precedence and checks), and shown as the `peftkit train ...` command line and the resolved recipe
  (`print_config`, what `--print-config` prints);
- the memory estimate is `train.reporting.memory_report.memory_estimate` (what the trainer prints before its
  first step), and the preview is the training split `train.splits.load_splits` tokenizes (what the model will
  actually learn from: its trained tokens and its masked ones).
"""

from __future__ import annotations

import shlex
from typing import Any

from peftkit.cli._declared import is_switch
from peftkit.cli.train import command_options
from peftkit.core.options import Option
from peftkit.errors import PeftkitError

KINDS = {int: "int", float: "float", bool: "bool", str: "str", dict: "dict", list: "str"}


def form_fields() -> list[dict[str, Any]]:
    """One entry per flag of `peftkit train`: name, flag, kind, default, help, choices, bounds, whether it is a
    switch (a flag without a --no- form) and whether it is an objective's option."""
    from peftkit.train.config import extra_options

    objective_options = set(extra_options())
    fields = []
    for option in command_options():
        if not option.cli:
            continue
        kind = "str" if isinstance(option.kind, tuple) else KINDS.get(option.kind, "str")
        fields.append({"name": option.name, "flag": option.cli_flags[0].split("/")[0], "kind": kind,
                       "default": option.default if not callable(option.default) else None,
                       "help": option.help, "choices": list(option.choices), "low": option.low,
                       "high": option.high, "switch": is_switch(option),
                       "objective_option": option.name in objective_options})
    return fields


def flag_values(form: dict[str, Any]) -> dict[str, Any]:
    """The page's values (text, or true / false for a checkbox; empty = not given) as the flags `load_sourced`
    takes, `set` as {key: value} from its `key=value` lines. An unknown name is an error, as an unknown flag is."""
    options = {option.name: option for option in command_options()}
    flags: dict[str, Any] = {}
    for name, value in form.items():
        if name == "set":
            flags["set"] = _set_pairs(value) or None
            continue
        if name not in options:
            raise PeftkitError(f"unknown option {name!r}; `peftkit train --help` lists the valid ones")
        if value is None or value == "":
            continue
        flags[name] = _pairs(name, value) if options[name].kind is dict and isinstance(value, str) else value
    return flags


def _set_pairs(text: Any) -> dict[str, str]:
    """`--set` lines (`key=value`, one per line or comma-free) as a dict, with the CLI's error for a bad one."""
    from peftkit.cli._options import parse_sets

    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    return parse_sets(lines)


def _pairs(name: str, text: str) -> dict[str, str]:
    from peftkit.cli._declared import pairs

    return pairs(f"--{name.replace('_', '-')}", [text])


def command_line(flags: dict[str, Any]) -> list[str]:
    """The `peftkit train` argv that gives these flags, in the options' declaration order (`--set` last)."""
    argv = ["peftkit", "train"]
    for option in command_options():
        if option.name in flags and option.name != "set":
            argv += _flag(option, flags[option.name])
    return argv + [part for key, val in (flags.get("set") or {}).items() for part in ("--set", f"{key}={val}")]


def _flag(option: Option, value: Any) -> list[str]:
    spelled = option.cli_flags[0]
    if option.kind is bool:
        on = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
        if "/" in spelled:
            yes, no = spelled.split("/")
            return [yes if on else no]
        return [spelled] if on else []
    if isinstance(value, dict):
        value = ",".join(f"{k}={v}" for k, v in value.items())
    return [spelled, str(value)]


def shell_text(argv: list[str]) -> str:
    """The command as a user pastes it into a shell."""
    return shlex.join(argv)


def plan(form: dict[str, Any], preview_rows: int = 3) -> dict[str, Any]:
    """What the page shows before launch: the command, the recipe, the estimate and the preview.

    Raises PeftkitError (the CLI's one line) for what the CLI would refuse before training: a bad value, a
    malformed or unreadable data file, a run that cannot be estimated is not an error (the trainer trains anyway).
    """
    from peftkit.train.config import load_sourced, print_config

    flags = flag_values(form)
    cfg, sources = load_sourced(None, flags)
    argv = command_line(flags)
    result: dict[str, Any] = {"argv": argv, "command": shell_text(argv), "recipe": print_config(cfg, sources)}
    from peftkit.ui.preview import data_preview, estimate

    result["estimate"] = estimate(cfg)
    result["preview"] = data_preview(cfg, preview_rows)
    return result
