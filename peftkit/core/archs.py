"""Per-architecture defaults: which modules LoRA targets, where the decoder layers, attention and MLP live.

Methods look these up by the model's `config.model_type` instead of hard-coding module names. An architecture that
is not listed falls back to discovery: the decoder layers are the largest `nn.ModuleList` of the model, and the
default LoRA targets are the linear layers found inside them (a warning says so).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class ArchSpec:
    """Module names of one architecture, relative to the model or to one decoder layer.

    layers: dotted path from the CausalLM model to the `nn.ModuleList` of decoder layers.
    lora_targets: PEFT's default LoRA target module names for this architecture.
    attention / mlp: the attention and MLP submodules of one decoder layer (bottleneck adapters wrap these).
    attention_out: the attention output projection of one decoder layer.
    output_embedding: name of the LM head ("all-linear" never targets it, as in PEFT).
    """

    layers: str
    lora_targets: tuple[str, ...]
    attention: str
    mlp: str
    attention_out: str
    output_embedding: str = "lm_head"
    discovered: bool = False


_LLAMA_LIKE = ArchSpec(
    layers="model.layers",
    lora_targets=("q_proj", "v_proj"),
    attention="self_attn",
    mlp="mlp",
    attention_out="self_attn.o_proj",
)

ARCHS: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "phi3": ArchSpec(
        layers="model.layers",
        lora_targets=("qkv_proj",),
        attention="self_attn",
        mlp="mlp",
        attention_out="self_attn.o_proj",
    ),
    "gpt2": ArchSpec(
        layers="transformer.h",
        lora_targets=("c_attn",),
        attention="attn",
        mlp="mlp",
        attention_out="attn.c_proj",
    ),
}

LINEAR_TYPES = (nn.Linear, Conv1D)


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    """`root.get_submodule(path)`, or None when the path does not exist."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _discover_layers(model: nn.Module) -> str:
    """Dotted path of the longest `nn.ModuleList` in the model: the decoder stack in every HF causal LM."""
    best, best_len = "", 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > best_len:
            best, best_len = name, len(module)
    return best


def _discover_spec(model: nn.Module) -> ArchSpec:
    """Build an ArchSpec for an unknown architecture from the module tree of its first decoder layer."""
    layers = _discover_layers(model)
    first = get_submodule(model, f"{layers}.0") if layers else None
    names: list[str] = []
    attention = mlp = attention_out = ""
    if first is not None:
        for name, module in first.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, LINEAR_TYPES) and leaf not in names:
                names.append(leaf)
            if not attention and "attn" in leaf.lower() and not isinstance(module, LINEAR_TYPES):
                attention = name
            if not mlp and leaf.lower() in ("mlp", "ffn", "feed_forward"):
                mlp = name
    return ArchSpec(
        layers=layers,
        lora_targets=tuple(names),
        attention=attention,
        mlp=mlp,
        attention_out=attention_out,
        discovered=True,
    )


def arch_spec(model: nn.Module) -> ArchSpec:
    """The ArchSpec for `model`'s `config.model_type`; unknown types are discovered, with a warning saying so."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHS:
        return ARCHS[model_type]
    spec = _discover_spec(model)
    warnings.warn(
        f"peftkit has no defaults for model_type {model_type!r}; discovered decoder layers at {spec.layers!r} "
        f"and linear layers {list(spec.lora_targets)} inside them (pass --target-modules to choose)",
        stacklevel=2,
    )
    return spec


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of `model` (raises AttributeError if the spec's path does not exist)."""
    return model.get_submodule(arch_spec(model).layers)
