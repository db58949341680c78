"""A model folder's config.json: checked before transformers reads it (`check_model_config`), and made complete
for readers beyond transformers (llama.cpp's converter and vLLM pick the model class by `architectures`; older
readers want `torch_dtype`): the one writer of those fields, used by the GGUF conversion, full / freeze results and
the streaming merge."""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from peftkit.errors import PeftkitError
from peftkit.io.fs import read_json_object

log = logging.getLogger(__name__)


# The sizes a config gives, each a positive integer where present. transformers builds per-layer lists from
# num_hidden_layers when it reads a config (10**9 layers: minutes and gigabytes before any check), and torch takes
# sizes as int64 but indexes embeddings and runs kernels within int32: no real model comes near either bound.
SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "head_dim", "max_position_embeddings", "n_embd", "n_layer", "n_head", "n_positions")
LAYER_FIELDS = ("num_hidden_layers", "n_layer")
MAX_LAYERS = 10_000  # the deepest published models have a few hundred layers
MAX_SIZE = 2**31 - 1


def check_config_sizes(config: dict[str, Any], where: str) -> None:
    """Refuse config fields whose sizes are not positive integers or are beyond any model (SIZE_FIELDS): a negative
    or fractional size crashed torch, a huge layer count hung transformers' own config reader. One line naming
    `where` (the file), the field and what would be right."""
    for field in SIZE_FIELDS:
        value = config.get(field)
        if value is None:
            continue
        limit = MAX_LAYERS if field in LAYER_FIELDS else MAX_SIZE
        if type(value) is not int or not 0 < value <= limit:
            raise PeftkitError(f"{where}: {field} is {value!r}; it must be a whole number from 1 to {limit:,} (the "
                               "config is damaged or not this model's)")


def causal_lm_class(model_type: str | None) -> str | None:
    """The class name AutoModelForCausalLM builds for `model_type` ("llama" -> "LlamaForCausalLM"), or None."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) if isinstance(model_type, str) else None


def complete_config(folder: Path, *, architectures: list[str] | None = None,
                    dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Make `folder/config.json` complete for readers beyond transformers; returns the new config.

    `architectures` (llama.cpp's converter and vLLM choose the model class by it): kept when the config has it,
    else the given `architectures`, else the class AutoModelForCausalLM maps the config's model_type to. `dtype`
    (the dtype the weights are stored in): written as both `dtype` (transformers 5) and `torch_dtype` (older
    readers); None keeps the config's, copying one name to the other. The file is replaced atomically.
    """
    path = folder / "config.json"
    config = read_json_object(path, "a model config")
    if not config.get("architectures"):
        found: Sequence[str | None] = architectures or [causal_lm_class(config.get("model_type"))]
        if None in found:
            log.warning("%s: no architectures and model_type %r maps to no causal LM class; left without",
                        path, config.get("model_type"))
        else:
            config["architectures"] = list(found)
    name = str(dtype).removeprefix("torch.") if dtype is not None else config.get("dtype") or config.get("torch_dtype")
    if name:
        config["dtype"] = config["torch_dtype"] = name
    tmp = folder / f".config.json.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return config
