"""Convert a GGUF checkpoint into an ordinary Hugging Face folder (config + safetensors + tokenizer).

transformers de-quantizes GGUF weights to fp32 on load, but marks the model as quantized and refuses
`save_pretrained`, so the folder is written here by hand: config.json, model.safetensors (a tied lm_head is not
stored twice), generation_config.json, the tokenizer files and `CONVERSION_FILE`. The folder appears atomically.

config.json is complete for readers beyond transformers: a GGUF-loaded config has no `architectures`, which
llama.cpp's converter and vLLM pick the model class from, so it is set from the model's class, and the dtype is
written under both names (`dtype` for transformers 5, `torch_dtype` for older readers). `CONVERSION_FILE` records
`CONVERSION_VERSION`, so a folder written by an older conversion is recognised and repaired
(`peftkit.io.models.embedded_folder`), and the size of every file written, so a damaged cache (a truncated or
deleted file) is found at the next load and converted again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from peftkit.io.fs import atomic_dir, save_tensors
from peftkit.io.model_config import complete_config

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

# 1: config.json without architectures / torch_dtype (and no CONVERSION_FILE); 2: complete config.json.
CONVERSION_VERSION = 2
CONVERSION_FILE = ".peftkit-conversion.json"  # hidden: merges copy a base's other small files


def convert_gguf(gguf: Path, folder: Path) -> None:
    """De-quantize `gguf` to fp32 and write it to `folder` as a HF model folder (takes ~30 s for 135M)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    log.info("converting %s to a Hugging Face folder in %s (once; later loads are fast)...", gguf.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    with atomic_dir(folder, command="convert") as tmp:
        write_model_config(model, tmp, torch.float32)
        tokenizer.save_pretrained(tmp)
        save_tensors(state, tmp / "model.safetensors", metadata={"format": "pt"})
        write_conversion_version(tmp, gguf.name)
    log.info("converted in %.1f s", time.perf_counter() - start)


def write_model_config(model: PreTrainedModel, folder: Path, dtype: torch.dtype) -> None:
    """config.json and generation_config.json of `model`'s weights stored as `dtype` in `folder`: `architectures`
    from the model's class, the dtype under both names, and no quantization_config (the weights are de-quantized)
    nor the GGUF's internal name."""
    from transformers import GenerationConfig

    config = model.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            with contextlib.suppress(AttributeError):  # a class attribute shows in hasattr but cannot be deleted
                delattr(config, attr)
    config.architectures = [type(model).__name__]
    config.dtype = dtype
    config.save_pretrained(folder)
    complete_config(folder, dtype=dtype)
    generation = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(config)
    generation.save_pretrained(folder)


def write_conversion_version(folder: Path, source: str) -> None:
    """Record in `folder` that the current conversion (`CONVERSION_VERSION`) wrote it, from GGUF file `source`, and
    the size of every file it holds (what `damaged_files` checks)."""
    tmp = folder / f"{CONVERSION_FILE}.tmp"
    record = {"conversion_version": CONVERSION_VERSION, "source": source, "files": _sizes(folder)}
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(folder / CONVERSION_FILE)


def _sizes(folder: Path) -> dict[str, int]:
    """{name: bytes} of the regular files in `folder` (peftkit's own record files left out)."""
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir())
            if p.is_file() and not p.is_symlink() and not p.name.startswith(CONVERSION_FILE)}


def damaged_files(folder: Path) -> list[str] | None:
    """The files of a converted folder that are missing, not regular files, or not the size recorded when it was
    written ([] when all fit); None when the record holds no sizes (an older conversion wrote it)."""
    try:
        recorded = json.loads((folder / CONVERSION_FILE).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(recorded, dict):
        return None
    found = _sizes(folder)
    return [name for name, size in recorded.items() if found.get(str(name)) != size]


def conversion_version(folder: Path) -> int:
    """The conversion version that wrote `folder` (1 for the first one, which left no record)."""
    try:
        value = json.loads((folder / CONVERSION_FILE).read_text()).get("conversion_version", 1)
    except (OSError, ValueError, AttributeError):
        return 1
    return value if isinstance(value, int) else 1
