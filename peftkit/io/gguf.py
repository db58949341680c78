"""Convert a GGUF checkpoint into an ordinary Hugging Face folder (config + safetensors + tokenizer).

transformers de-quantizes GGUF weights to fp32 on load, but marks the model as quantized and refuses
`save_pretrained`, so the folder is written here by hand: config.json, model.safetensors (a tied lm_head is not
stored twice), generation_config.json and the tokenizer files. The folder appears atomically.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from peftkit.io.fs import atomic_dir

log = logging.getLogger(__name__)


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
    config = model.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            with contextlib.suppress(AttributeError):  # a class attribute shows in hasattr but cannot be deleted
                delattr(config, attr)
    config.dtype = torch.float32
    with atomic_dir(folder, command="convert") as tmp:
        config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    log.info("converted in %.1f s", time.perf_counter() - start)
