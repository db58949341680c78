"""A model folder's config.json made complete for readers beyond transformers (llama.cpp's converter and vLLM pick
the model class by `architectures`; older readers want `torch_dtype`): the one writer of those fields, used by the
GGUF conversion, full / freeze results and the streaming merge."""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from peftkit.io.fs import read_json_object

log = logging.getLogger(__name__)


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
