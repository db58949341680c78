"""Offline model presets and model-config resolution (preset name, config.json, model folder, or hub id).

The presets are the exact architecture fields of the released checkpoints' `config.json` (only the fields that
change parameter counts or activation shapes), so `peftkit estimate --model qwen1.5-72b` works with no network.
A preset's parameter count equals the released model's, e.g. Qwen1.5-7B 7,721,324,544:

    embeddings + lm_head  2 * V * h                          (untied)
    per layer             4 * h^2 + 3 * h (q/k/v biases) + 3 * h * i (gate/up/down) + 2 * h (norms)
                          (GQA models: q and o are h x h, k and v are h x kv_heads*head_dim)
    final norm            h
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from peftkit.errors import PeftkitError
from peftkit.io.fs import read_json_object
from peftkit.io.model_config import check_config_sizes

_LLAMA = {"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
_QWEN2 = {"model_type": "qwen2", "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
_OLMOE = {"model_type": "olmoe", "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
          "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False}
_QWEN3_MOE = {"model_type": "qwen3_moe", "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "moe_intermediate_size": 768,
              "head_dim": 128}


def _arch(base: dict, h: int, i: int, layers: int, heads: int, kv: int, vocab: int, **extra: Any) -> dict:
    return {
        **base,
        "hidden_size": h,
        "intermediate_size": i,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        **extra,
    }


PRESETS: dict[str, tuple[str, dict]] = {
    # name: (hub id it mirrors, config fields)
    "qwen1.5-7b": ("Qwen/Qwen1.5-7B", _arch(_QWEN2, 4096, 11008, 32, 32, 32, 151936)),
    "qwen1.5-72b": ("Qwen/Qwen1.5-72B", _arch(_QWEN2, 8192, 24576, 80, 64, 64, 152064)),
    "qwen2.5-0.5b": ("Qwen/Qwen2.5-0.5B", _arch(_QWEN2, 896, 4864, 24, 14, 2, 151936, tie_word_embeddings=True)),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B", _arch(_QWEN2, 3584, 18944, 28, 28, 4, 152064)),
    "qwen2.5-72b": ("Qwen/Qwen2.5-72B", _arch(_QWEN2, 8192, 29568, 80, 64, 8, 152064)),
    "llama-2-7b": ("meta-llama/Llama-2-7b-hf", _arch(_LLAMA, 4096, 11008, 32, 32, 32, 32000)),
    "llama-2-70b": ("meta-llama/Llama-2-70b-hf", _arch(_LLAMA, 8192, 28672, 80, 64, 8, 32000)),
    "llama-3-8b": ("meta-llama/Meta-Llama-3-8B", _arch(_LLAMA, 4096, 14336, 32, 32, 8, 128256, rope_theta=5e5)),
    "llama-3-70b": ("meta-llama/Meta-Llama-3-70B", _arch(_LLAMA, 8192, 28672, 80, 64, 8, 128256, rope_theta=5e5)),
    "mistral-7b": (
        "mistralai/Mistral-7B-v0.1",
        _arch({**_LLAMA, "model_type": "mistral"}, 4096, 14336, 32, 32, 8, 32000, sliding_window=4096),
    ),
    # mixture-of-experts: intermediate_size is one expert's MLP (OLMoE), or the dense MLP no layer of Qwen3-MoE has
    "olmoe-1b-7b": ("allenai/OLMoE-1B-7B-0924", _arch(_OLMOE, 2048, 1024, 16, 16, 16, 50304)),
    "qwen3-30b-a3b": ("Qwen/Qwen3-30B-A3B", _arch(_QWEN3_MOE, 2048, 6144, 48, 32, 4, 151936)),
    "smollm2-135m": (
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        _arch(_LLAMA, 576, 1536, 30, 9, 3, 49152, tie_word_embeddings=True),
    ),
}

REQUIRED_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "vocab_size")  # fmt: skip


def preset_names() -> list[str]:
    """Names `--model` accepts without a path or network (case-insensitive)."""
    return list(PRESETS)


def _from_dict(fields: dict, source: str) -> PretrainedConfig:
    """A transformers config from config.json fields; names the required fields that are missing."""
    missing = [f for f in REQUIRED_FIELDS if f not in fields]
    if missing:
        raise PeftkitError(f"{source} lacks the fields the estimate needs: {', '.join(missing)}")
    check_config_sizes(fields, source)
    fields = dict(fields)
    model_type = fields.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except ValueError as exc:
        raise PeftkitError(f"{source}: model_type {model_type!r} is unknown to transformers ({exc})") from None
    except TypeError as exc:  # transformers' check of a field's type
        raise PeftkitError(f"{source}: {' '.join(str(exc).split())}") from None


def resolve_config(model: str | PretrainedConfig | dict) -> tuple[PretrainedConfig, str]:
    """(config, label) for a preset name, a config.json path, a model folder, a hub id, a dict or a config.

    Hub ids are looked up only in the local Hugging Face cache (no download), so an offline machine gets a clear
    error that says to pass a preset or a config.json instead.
    """
    if isinstance(model, PretrainedConfig):
        return model, getattr(model, "name_or_path", "") or model.model_type
    if isinstance(model, dict):
        return _from_dict(model, "the config dict"), "config dict"
    key = model.strip().lower()
    if key in PRESETS:
        hub_id, fields = PRESETS[key]
        return _from_dict(fields, f"preset {key}"), hub_id
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise PeftkitError(f"{path.parent} has no config.json; pass a preset ({', '.join(PRESETS)}) or a config")
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise PeftkitError(f"config file {path} does not exist")
        fields = read_json_object(path, "a model's config.json")
        fields = fields.get("text_config", fields) if "hidden_size" not in fields else fields
        return _from_dict(fields, str(path)), str(path)
    if "/" in model and not model.startswith((".", "/")):
        return _from_hub_cache(model), model
    raise PeftkitError(f"unknown model {model!r}; presets: {', '.join(PRESETS)} (or a config.json, folder, hub id)")


def _from_hub_cache(hub_id: str) -> PretrainedConfig:
    """The config of `hub_id` from the local HF cache only; a clear error when it is not cached."""
    try:
        return AutoConfig.from_pretrained(hub_id, local_files_only=True)
    except (OSError, ValueError):
        raise PeftkitError(
            f"no cached config for hub id {hub_id!r} and peftkit estimate does not download; pass a preset "
            f"({', '.join(PRESETS)}), a config.json path or a model folder"
        ) from None
