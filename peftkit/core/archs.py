"""Per-architecture facts: which modules LoRA targets, where the decoder layers, attention and MLP live, and the
attention shape read from the config.

Methods look these up by the model's `config.model_type` instead of hard-coding module names. An architecture that
is not listed falls back to discovery: the decoder layers are the largest `nn.ModuleList` of the model, and the
default LoRA targets are the linear layers found inside them (a warning says so).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.errors import PeftkitError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    """Module names of one architecture, relative to the model or to one decoder layer.

    layers: dotted path from the CausalLM model to the `nn.ModuleList` of decoder layers.
    lora_targets: PEFT's default LoRA target module names for this architecture.
    attention / mlp: the attention and MLP submodules of one decoder layer (bottleneck adapters wrap these).
    output_embedding: name of the LM head ("all-linear" never targets it, as in PEFT).
    """

    layers: str
    lora_targets: tuple[str, ...]
    attention: str
    mlp: str
    output_embedding: str = "lm_head"


_LLAMA_LIKE = ArchSpec(
    layers="model.layers",
    lora_targets=("q_proj", "v_proj"),
    attention="self_attn",
    mlp="mlp",
)

ARCHS: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "qwen3_moe": _LLAMA_LIKE,
    "olmoe": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "phi3": ArchSpec(
        layers="model.layers",
        lora_targets=("qkv_proj",),
        attention="self_attn",
        mlp="mlp",
    ),
    "gpt2": ArchSpec(
        layers="transformer.h",
        lora_targets=("c_attn",),
        attention="attn",
        mlp="mlp",
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
    attention = mlp = ""
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
    )


def arch_spec(model: nn.Module) -> ArchSpec:
    """The ArchSpec for `model`'s `config.model_type`; unknown types are discovered, with a warning saying so."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHS:
        return ARCHS[model_type]
    spec = _discover_spec(model)
    log.warning(
        "peftkit has no defaults for model_type %r; discovered decoder layers at %r and linear layers %s inside them "
        "(pass --target-modules to choose)", model_type, spec.layers, list(spec.lora_targets),
    )
    return spec


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of `model` (raises AttributeError if the spec's path does not exist)."""
    return cast(nn.ModuleList, model.get_submodule(arch_spec(model).layers))  # the spec names a ModuleList


def text_config(model_or_config: Any) -> Any:
    """The config of a model (or the config itself), its text part for a multimodal one."""
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def hidden_size(model_or_config: Any) -> int:
    """The residual-stream width d."""
    return text_config(model_or_config).hidden_size


def model_dims(model_or_config: Any) -> dict[str, int]:
    """num_layers, hidden, heads, kv_heads, head_dim of a decoder-only model or its config (GQA-aware: kv_heads
    <= heads). The one reader of the attention-shape fields."""
    config = text_config(model_or_config)
    try:
        hidden, heads, layers = config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    except AttributeError as exc:
        raise PeftkitError(f"model_type {config.model_type!r}: cannot read the attention shape from its config ({exc})") from None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return {"num_layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Turn on activation (gradient) checkpointing, non-reentrant, under the name this transformers has
    (`activation_checkpointing_enable` in 5.x; the old `gradient_checkpointing_enable` is a deprecated alias)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def checkpointing_enabled(model: nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on, under either of transformers' names."""
    flag = getattr(type(model), "is_activation_checkpointing", None)
    name = "is_activation_checkpointing" if flag is not None else "is_gradient_checkpointing"
    return bool(getattr(model, name, False))
