"""Recipe keys: a YAML recipe read as peftkit's options, including the keys of the tools users come from
(LLaMA-Factory, axolotl, TRL / HF TrainingArguments).

The names with the same meaning are each option's `aliases` (declared with the option: `lr`'s `learning_rate`,
`rank`'s `lora_r`, ...); a key that only looks alike is not guessed at: an unknown key is an error that suggests
the closest peftkit key ("did you mean ..."). The small tables here are what a declaration cannot say: keys whose
meaning differs (`DIFFERENT`), and values whose form differs between the tools (`_value`: axolotl's list of target
modules, its `lora_target_linear: true`, LLaMA-Factory's `lora_target: all`, TrainingArguments' `fsdp` string).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from peftkit.core.options import Option
from peftkit.errors import PeftkitError

# keys whose names suggest a peftkit key but whose meaning differs: say what to use instead
DIFFERENT = {
    "dataset": "data (a data file, datasets folder or hub name; LLaMA-Factory's dataset names a dataset_info.json entry)",
    "datasets": "data (a data file, datasets folder or hub name, or a list of them / of {path, weight} to mix; "
                "columns: maps column names)",
    "fsdp_config": "fsdp: true (FSDP2 full shard, one unit per decoder layer; the other FSDP settings are peftkit's)",
}
FSDP_FULL_SHARD = "full_shard"  # TrainingArguments' / axolotl's `fsdp: "full_shard auto_wrap"` (or a list)
SWITCHES = {"lora_target_linear": ("target_modules", "all-linear")}  # axolotl's `key: true` -> option: value


class _UniqueKeys(yaml.SafeLoader):
    """yaml's SafeLoader, refusing a key given twice in one mapping (YAML itself keeps the last one silently, so
    `rank: 4` ... `rank: 8` would train with 8 whatever the reader of the recipe believed)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: list[Any] = []
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here, on purpose
            continue
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice", key_node.start_mark)
        seen.append(key)
    return loader.construct_mapping(node)


_UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_recipe_file(path: str | Path, options: Iterable[Option]) -> dict[str, tuple[str, Any]]:
    """option name -> (the key as written, value) of the YAML recipe at `path`, keys translated (`translate_keys`)."""
    file = Path(path)
    if not file.is_file():
        raise PeftkitError(f"recipe {str(file)!r} does not exist")
    try:
        data = yaml.load(file.read_text(), Loader=_UniqueKeys) or {}  # a SafeLoader
    except yaml.YAMLError as exc:
        raise PeftkitError(f"recipe {file} is not valid YAML: {' '.join(str(exc).split())}") from None
    except UnicodeDecodeError as exc:
        raise PeftkitError(f"recipe {file} is not UTF-8 text ({exc.reason} at byte {exc.start}); a recipe is a "
                           "YAML file") from None
    except RecursionError:
        raise PeftkitError(f"recipe {file} nests deeper than a YAML reader goes; a recipe is a flat mapping of "
                           "option: value") from None
    if not isinstance(data, dict):
        raise PeftkitError(f"recipe {file} must be a mapping of option: value")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    return translate_keys(data, options, f"recipe {file}")


def translate(data: dict[str, Any], valid: Iterable[str | Option], source: str) -> dict[str, Any]:
    """`data` with the other tools' keys renamed to peftkit's; `valid`: option names or Options (whose aliases are
    accepted too); unknown keys refused with a suggestion."""
    return {name: value for name, (_, value) in translate_keys(data, valid, source).items()}


def translate_keys(data: dict[str, Any], valid: Iterable[str | Option], source: str) -> dict[str, tuple[str, Any]]:
    """option name -> (the key as written, value), values in peftkit's form; a key naming an option twice (as itself
    and an alias) is an error."""
    names, aliases = _vocabulary(valid)
    out: dict[str, tuple[str, Any]] = {}
    for key, value in data.items():
        if key in SWITCHES:
            if value is True:
                switch_name, value = SWITCHES[key]
                out.setdefault(switch_name, (key, value))
            continue
        name = key if key in names else aliases.get(key)
        if name is None:
            raise PeftkitError(f"{source} has the unknown key {key!r}; {_suggest(key, names, aliases)}")
        if name in out and out[name][0] not in SWITCHES:
            raise PeftkitError(f"{source} sets {name!r} twice (as {key!r} and under another name); keep one")
        out[name] = (key, _value(key, value))
    return out


def _vocabulary(valid: Iterable[str | Option]) -> tuple[list[str], dict[str, str]]:
    """(the option names, alias -> name) of `valid`."""
    names: list[str] = []
    aliases: dict[str, str] = {}
    for item in valid:
        if isinstance(item, Option):
            names.append(item.name)
            aliases.update(dict.fromkeys(item.aliases, item.name))
        else:
            names.append(item)
    return names, aliases


def _value(key: str, value: Any) -> Any:
    """Values whose form differs between the tools."""
    if key in ("lora_target_modules", "lora_target") and isinstance(value, list):
        return ",".join(str(v) for v in value)
    if key == "report_to" and isinstance(value, list):  # HF / TRL / LLaMA-Factory also take a list of trackers
        return ",".join(str(v) for v in value) or "none"
    if key == "lora_target" and value == "all":
        return "all-linear"
    if key == "pref_loss" and value == "sigmoid":  # LLaMA-Factory's name for the DPO loss
        return "dpo"
    if key == "fsdp" and isinstance(value, str | list):
        words = value.split() if isinstance(value, str) else [str(v) for v in value]
        if FSDP_FULL_SHARD not in words:
            raise PeftkitError(f"fsdp: {value!r} is not supported; peftkit shards with FSDP2 full shard (fsdp: true, "
                               "or TrainingArguments' 'full_shard auto_wrap')")
        return True
    return value


def _suggest(key: str, names: list[str], aliases: dict[str, str]) -> str:
    if key in DIFFERENT:
        return f"use {DIFFERENT[key]}"
    close = difflib.get_close_matches(key, names + list(aliases), n=1, cutoff=0.6)
    if close:
        return f"did you mean {aliases.get(close[0], close[0])!r}?"
    return f"valid keys: {', '.join(names)}"
