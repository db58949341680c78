"""docs/options.md, generated from the options' declarations (`python scripts/make_options_doc.py` writes it;
tests/train/test_options_doc.py fails when the committed file differs from `options_markdown()`)."""

from __future__ import annotations

from typing import Any

import yaml

from peftkit.core.method_options import SHARED
from peftkit.core.options import Option, describe_kind
from peftkit.core.registry import get_method, method_names
from peftkit.train.config import extra_options, train_options
from peftkit.train.options.sources import PRECEDENCE

HEADER = f"""# Training options

Generated from the declarations (`TrainConfig`'s fields in peftkit/train/config.py, the shared method options in
peftkit/core/method_options.py) by `python scripts/make_options_doc.py`; do not edit by hand.

Every option is a recipe key (the first column) and, unless marked "recipe only", a `peftkit train` flag. Keys of
other tools (LLaMA-Factory, axolotl, TRL / HF TrainingArguments) with the same meaning are read as the option.
Precedence: `{PRECEDENCE}`; a value given twice is a warning naming the one ignored, and `--print-config` says
where each value came from.
"""


def options_markdown() -> str:
    """The whole of docs/options.md."""
    trainer = [o for name, o in train_options().items() if name not in SHARED]
    extra = [o for _, o in extra_options().values()]
    parts = [HEADER, "## Trainer options\n", _table(trainer + extra), "## Method options (shared)\n",
             "A method reads the ones it has a config field for; `--set FIELD=value` with that field is the same "
             "option (`--set r=4` is `--rank 4`). Any other config field: `--set key=value` (docs/methods.md).\n",
             _table(list(SHARED.values()), fields=True)]
    return "\n".join(parts)


def _table(options: list[Option], fields: bool = False) -> str:
    head = ["option", "flags", "type", "default", "allowed", "other tools' keys", *(["config field"] if fields else []),
            "what"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for o in options:
        cells = [f"`{o.name}`", _flags(o), describe_kind(o.kind), _default(o.default), _allowed(o),
                 ", ".join(f"`{a}`" for a in o.aliases), *([_fields(o)] if fields else []), o.help.replace("|", "\\|")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _flags(o: Option) -> str:
    if not o.cli:
        return "recipe only" if o.name != "set" else "`--set key=value`"
    return ", ".join(f"`{f}`" for f in o.cli_flags) + (" (repeatable)" if o.multiple else "")


def _default(value: Any) -> str:
    return "unset" if value is None else f"`{yaml.safe_dump(value, default_flow_style=True).splitlines()[0]}`"


def _allowed(o: Option) -> str:
    if o.choices:
        return " \\| ".join(o.choices)
    return o.describe_bounds()


def _fields(o: Option) -> str:
    """Which config field each method maps the shared option to: "lora, qlora: `r`"."""
    by_field: dict[str, list[str]] = {}
    for name in method_names():
        target = get_method(name).option_fields.get(o.name)
        if target:
            by_field.setdefault(target, []).append(name)
    return "; ".join(f"{', '.join(names)}: `{target}`" for target, names in by_field.items())
