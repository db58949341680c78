"""Where each training option's value comes from, and the one precedence: flag > `--set` > recipe > default.

`gather` merges the recipe (its keys and its `set:` mapping), `--set key=value` pairs and the flags into the
values `TrainConfig` is built from. A `set` key that is a method config field behind a shared option (`r` behind
`rank`, `lora_alpha` behind `alpha`) is that option, so `--rank 8 --set r=4` gives `rank` twice: the flag wins and a
warning names the value ignored. `render_yaml` prints the resolved values as a recipe with a comment per key saying
where each came from (`--print-config`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from peftkit.core.options import Option
from peftkit.core.registry import get_method
from peftkit.errors import PeftkitError

if TYPE_CHECKING:
    from peftkit.core.method import Method

log = logging.getLogger(__name__)

PRECEDENCE = "flag > --set > recipe > default"


@dataclass
class Given:
    """One option's value as given: `source` says where from ("flag --rank", "--set r=4", "recipe r.yaml (lora_r)"),
    `ignored` the other values given for it that precedence overruled ("--set r=4")."""

    value: Any
    source: str
    shown: str  # the source with the value, as a warning names it ("flag --rank 8", "lora_r: 4 in recipe r.yaml")
    ignored: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """"flag --rank (also --set r=4, ignored)"."""
        return self.source + (f" (also {', '.join(self.ignored)}, ignored)" if self.ignored else "")


Layer = dict[str, Given]


def gather(recipe: dict[str, tuple[str, Any]], overrides: dict[str, Any], recipe_label: str,
           options: dict[str, Option], shared: set[str]) -> tuple[dict[str, Any], dict[str, Given]]:
    """(the values to build the config from, name -> Given) from a recipe (name -> (key as written, value)),
    overrides (flags by option name, None = not given, and "set": the `--set` pairs) and the declared options;
    `shared` names the options a method maps to its config fields."""
    flags = {k: v for k, v in overrides.items() if k != "set" and v is not None}
    method = _method(flags, recipe, options)
    recipe = dict(recipe)
    recipe_set = recipe.pop("set", ("set", {}))[1]
    cli_set = overrides.get("set") or {}
    in_recipe = _set_layer(method, recipe_set, shared, recipe_label)
    for name in sorted(set(in_recipe) & set(recipe)):
        key = next(k for k in recipe_set if method.canonical_key(str(k)) == name)
        raise PeftkitError(f"{recipe_label} sets {name!r} twice (as {recipe[name][0]!r} and as 'set.{key}'); keep one")
    layers = [{**_recipe_layer(recipe, recipe_label), **in_recipe}, _set_layer(method, cli_set, shared, None),
              _flag_layer(flags, options)]
    given: dict[str, Given] = {}
    for layer in layers:
        for name, new in layer.items():
            given[name] = _overrule(name, given.get(name), new, options.get(name))
    values = {name: g.value for name, g in given.items()}
    merged_set = _merged_set(method, recipe_set, cli_set, shared, recipe_label)
    if merged_set is not None:
        values["set"], given["set"] = merged_set.value, merged_set
    return values, given


def _method(flags: dict[str, Any], recipe: dict[str, tuple[str, Any]], options: dict[str, Option]) -> Method:
    """The method whose config fields `set` keys name (checked: its fields decide what `r` means)."""
    method = flags.get("method", recipe.get("method", (None, options["method"].default))[1])
    return get_method(options["method"].check(method, required=True))


def _recipe_layer(recipe: dict[str, tuple[str, Any]], label: str) -> Layer:
    out = {}
    for name, (key, value) in recipe.items():
        source = label if key == name else f"{label} ({key})"
        out[name] = Given(value, source, f"{key}: {value!r} in {label}")
    return out


def _set_layer(method: Method, pairs: Any, shared: set[str], recipe_label: str | None) -> Layer:
    """The shared options among `set` pairs (`r=4` -> rank), each once: a recipe's `set:` (`recipe_label`) or the
    `--set` pairs (None)."""
    out: Layer = {}
    for key, value in pairs.items() if isinstance(pairs, dict) else ():
        name = method.canonical_key(str(key))
        if name not in shared:
            continue
        if name in out:
            where = recipe_label or "--set"
            raise PeftkitError(f"{where} gives {name} twice ({out[name].source} and {key}); keep one")
        if recipe_label is None:
            out[name] = Given(value, f"--set {key}={value}", f"--set {key}={value}")
        else:
            out[name] = Given(value, f"{recipe_label} (set.{key})", f"set.{key}: {value!r} in {recipe_label}")
    return out


def _flag_layer(flags: dict[str, Any], options: dict[str, Option]) -> Layer:
    out = {}
    for name, value in flags.items():
        spelled = options[name].spelled(value) if name in options else f"--{name}"
        shown = spelled if isinstance(value, bool) else f"{spelled} {value}"
        out[name] = Given(value, f"flag {spelled}", f"flag {shown}")
    return out


def _overrule(name: str, old: Given | None, new: Given, declared: Option | None) -> Given:
    """`new` over `old` (a lower layer's): a different value ignored is listed and warned about."""
    if old is None:
        return new
    if not _differ(old.value, new.value, declared):
        return Given(new.value, new.source, new.shown, old.ignored)
    log.warning("%s: %s is used, %s is ignored (precedence: %s)", name, new.shown, old.shown, PRECEDENCE)
    return Given(new.value, new.source, new.shown, [*old.ignored, old.shown])


def _differ(a: Any, b: Any, declared: Option | None) -> bool:
    """Whether two given values differ once read as the option's type ("8" and 8 do not)."""
    if declared is not None:
        try:
            return declared.check(a) != declared.check(b)
        except PeftkitError:
            return True
    return a != b


def _merged_set(method: Method, recipe_set: Any, cli_set: Any, shared: set[str], recipe_label: str) -> Given | None:
    """The `set` mapping without the shared options: the recipe's fields, then `--set`'s (which win, warned)."""
    if not isinstance(recipe_set, dict) or not isinstance(cli_set, dict):
        bad = cli_set if not isinstance(cli_set, dict) else recipe_set
        return Given(bad, "set", "set")  # not a mapping: the config's own error says so
    if not recipe_set and not cli_set:
        return None
    merged: dict[str, Any] = {}
    sources = []
    for pairs, label in ((recipe_set, recipe_label), (cli_set, "--set")):
        own = {k: v for k, v in pairs.items() if method.canonical_key(str(k)) not in shared}
        for key, value in own.items():
            if key in merged and merged[key] != value:
                log.warning("set %s: --set %s=%s is used, %s: %r in %s is ignored (precedence: %s)", key, key,
                            value, key, merged[key], recipe_label, PRECEDENCE)
            merged[key] = value
        if own:
            sources.append(f"{label} {', '.join(f'{k}={v}' for k, v in own.items())}" if label == "--set" else label)
    return Given(merged, " + ".join(sources) or "default", "set") if merged else None


def render_yaml(values: dict[str, Any], notes: dict[str, str]) -> str:
    """`values` as a YAML recipe, one key a line in the given order, each with `  # note` (its provenance)."""
    lines = []
    for key, value in values.items():
        text = yaml.safe_dump({key: value}, default_flow_style=True, sort_keys=False, width=1 << 30).strip()
        lines.append(f"{text[1:-1]}  # {notes.get(key, 'default')}")
    return "\n".join(lines) + "\n"
