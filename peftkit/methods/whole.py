"""The two trainer methods that inject nothing: `full` (every weight trainable) and `freeze` (last N layers).

Both save a complete model folder (config + safetensors + tokenizer) that `AutoModelForCausalLM.from_pretrained`
loads, so `peftkit compress` can diff it against the base model and turn the delta into a LoRA adapter.
Every other method name goes through the registry (`peftkit.core.registry.get_method`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from peftkit.io.adapters import META_NAME, atomic_dir, base_model_id
from peftkit.core.archs import decoder_layers
from peftkit.errors import PeftkitError

FULL_METHODS = ("full", "freeze")
DEFAULT_FREEZE_LAYERS = 2


def is_full(method: str) -> bool:
    """Whether `method` trains base weights (no adapter modules)."""
    return method.lower() in FULL_METHODS


def prepare_full(model: nn.Module, method: str, options: dict[str, Any]) -> None:
    """Set `requires_grad`: all parameters for `full`; only the last `layers` decoder layers for `freeze`.

    `freeze` takes one option, `layers` (`--set layers=N`, default 2); `full` takes none.
    """
    method = method.lower()
    allowed = {"layers"} if method == "freeze" else set()
    unknown = sorted(set(options) - allowed)
    if unknown:
        valid = ", ".join(sorted(allowed)) or "none"
        raise PeftkitError(f"method {method!r} has no option {', '.join(unknown)}; valid options: {valid}")
    if method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return
    stack = decoder_layers(model)
    n = int(options.get("layers", DEFAULT_FREEZE_LAYERS))
    if not 1 <= n <= len(stack):
        raise PeftkitError(f"freeze: layers must be between 1 and {len(stack)} (the model's decoder layers), got {n}")
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in list(stack)[-n:]:
        for param in layer.parameters():
            param.requires_grad_(True)


def save_full(model: nn.Module, tokenizer: Any, path: str | Path, prompt_format: dict | None, method: str) -> Path:
    """Write the whole model as an HF folder (safetensors + config + tokenizer + peftkit.json), atomically."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        meta = {
            "method": method,
            "base_model_name_or_path": base_model_id(model),
            "prompt_format": prompt_format,
            "base_model_note": model.__dict__.get("peftkit_base_note"),
        }
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(path)
