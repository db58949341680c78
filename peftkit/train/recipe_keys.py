"""Recipe keys of the tools users come from (LLaMA-Factory, axolotl, TRL / HF TrainingArguments), read as peftkit's.

A key with the same meaning is accepted under its other name and translated (`learning_rate` -> `lr`,
`lora_r` -> `rank`, ...); a key that only looks alike is not guessed at: an unknown key is an error that suggests
the closest peftkit key ("did you mean ..."). Values that need translating are translated too (axolotl's list of
target modules, its `lora_target_linear: true`, LLaMA-Factory's `lora_target: all`).
"""

from __future__ import annotations

import difflib
from typing import Any

from peftkit.errors import PeftkitError

# other tool's key -> peftkit key (same meaning)
ALIASES: dict[str, str] = {
    # HF TrainingArguments / TRL SFTConfig (also used by LLaMA-Factory)
    "model_name_or_path": "model", "learning_rate": "lr", "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
    "warmup_steps": "warmup", "warmup_ratio": "warmup", "lr_scheduler_type": "scheduler", "output_dir": "output",
    "overwrite_output_dir": "overwrite", "max_seq_length": "max_length",
    # LLaMA-Factory
    "finetuning_type": "method", "lora_rank": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "lora_target": "target_modules", "cutoff_len": "max_length",
    # axolotl
    "base_model": "model", "adapter": "method", "lora_r": "rank", "lora_target_modules": "target_modules",
    "sequence_len": "max_length", "num_epochs": "epochs", "micro_batch_size": "batch_size",
    "lr_scheduler": "scheduler", "sample_packing": "packing", "train_on_inputs": "train_on_prompt",
    "val_set_size": "eval_split",
    # preference training: LLaMA-Factory's pref_loss (the objectives' own option aliases, e.g. `pref_beta`, are
    # declared with their options: train/objectives/)
    "pref_loss": "objective",
}
# keys whose names suggest a peftkit key but whose meaning differs: say what to use instead
DIFFERENT = {
    "dataset": "data (a data file, datasets folder or hub name; LLaMA-Factory's dataset names a dataset_info.json entry)",
    "datasets": "data (a data file, datasets folder or hub name, or a list of them / of {path, weight} to mix; "
                "columns: maps column names)",
    "fsdp_config": "fsdp: true (FSDP2 full shard, one unit per decoder layer; the other FSDP settings are peftkit's)",
}
FSDP_FULL_SHARD = "full_shard"  # TrainingArguments' / axolotl's `fsdp: "full_shard auto_wrap"` (or a list)


def translate(data: dict[str, Any], valid: list[str], source: str,
              more_aliases: dict[str, str] | None = None) -> dict[str, Any]:
    """`data` with the other tools' keys renamed to peftkit's (ALIASES, and `more_aliases`: the objectives'
    declared ones); unknown keys refused with a suggestion."""
    out: dict[str, Any] = {}
    aliases = {**ALIASES, **(more_aliases or {})}
    for key, value in data.items():
        if key == "lora_target_linear":  # axolotl's switch for all linear layers (handled below)
            continue
        name = key if key in valid else aliases.get(key)
        if name is None:
            raise PeftkitError(f"{source} has the unknown key {key!r}; {_suggest(key, valid)}")
        if name in out:
            raise PeftkitError(f"{source} sets {name!r} twice (as {key!r} and under another name); keep one")
        out[name] = _value(key, value)
    if data.get("lora_target_linear") is True:
        out["target_modules"] = "all-linear"
    return out


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


def _suggest(key: str, valid: list[str]) -> str:
    if key in DIFFERENT:
        return f"use {DIFFERENT[key]}"
    close = difflib.get_close_matches(key, valid + list(ALIASES), n=1, cutoff=0.6)
    if close:
        return f"did you mean {ALIASES.get(close[0], close[0])!r}?"
    return f"valid keys: {', '.join(valid)}"
