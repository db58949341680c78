"""Save and load adapters in HF PEFT's on-disk format, with atomic writes.

A saved adapter is a folder with `adapter_config.json` and `adapter_model.safetensors` exactly as HF PEFT writes
them, plus `peftkit.json` for what PEFT has no field for (the prompt format used in training, the method name, a
note on the base weights). Loading dispatches on the config's `peft_type` to the registered method.

`save_pretrained_adapter` is what `model.save_pretrained` of an adapted model does: `peftkit/__init__.py` registers
it with `peftkit.core.state.set_adapter_writer` (core may not import io), importing this module on the first save.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from peftkit._version import __version__
from peftkit.core.inject import layer_index
from peftkit.core.registry import get_method, method_for_peft_type
from peftkit.core.state import (
    adapters,
    base_model_id,
    base_model_note,
    resolve_name,
    set_prompt_format,
)
from peftkit.core.state import prompt_format as prompt_format_of
from peftkit.errors import PeftkitError
from peftkit.io.finite import check_finite
from peftkit.io.fs import atomic_dir, read_json_object, save_tensors
from peftkit.io.models import EMBEDDED_HUB_ID
from peftkit.io.prompt_format import check_prompt_format
from peftkit.io.quantize import quantization_record

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
META_NAME = "peftkit.json"


def save_adapter(
    model: nn.Module, path: str | os.PathLike, name: str | None = None, *, prompt_format: dict | None = None
) -> Path:
    """Write adapter `name` (default: the active one) to folder `path` in PEFT's format; returns the path.

    prompt_format: how prompts were built in training, e.g. {"chat_template": "..."} or {"plain_template": "..."},
    kept in peftkit.json so `generate` and `eval` reproduce it. The folder is written atomically.
    """
    return write_adapter_folder(path, *_export(model, name, prompt_format))


def save_pretrained_adapter(model: nn.Module, save_directory: str | os.PathLike, is_main_process: bool = True,
                            push_to_hub: bool = False, **_hf_options: Any) -> None:
    """`model.save_pretrained(save_directory, ...)` of an adapted model: the active adapter's files, exactly as
    `save_adapter` writes them, put into `save_directory` the way HF's method writes a model.

    Like HF (and unlike `save_adapter`, which owns its folder) it writes into a folder that may hold other files,
    since the Trainer saves into its output folder (checkpoint-N subfolders, the tokenizer, training_args.bin):
    nothing else there is touched and no ownership marker is added. The three files are written to a temporary
    folder inside `save_directory` and each renamed into place. HF's other options (state_dict, safe_serialization,
    max_shard_size, ...) are accepted and ignored: the adapter is read from the model and always written as
    safetensors. is_main_process=False (a non-writing rank) writes nothing; push_to_hub=True is refused.
    """
    if push_to_hub:
        raise PeftkitError("save_pretrained(push_to_hub=True) is not supported for a peftkit model; save the "
                           "adapter, then upload the folder with huggingface_hub.upload_folder")
    if not is_main_process:
        return
    folder = Path(save_directory)
    if folder.exists() and not folder.is_dir():
        raise PeftkitError(f"{str(folder)!r} is a file; save_pretrained writes into a folder")
    folder.mkdir(parents=True, exist_ok=True)
    config_json, tensors, meta = _export(model, None, None)
    tmp = folder / f".peftkit-save-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_adapter_files(tmp, config_json, tensors, meta)
        for name in (WEIGHTS_NAME, META_NAME, CONFIG_NAME):  # the config last: readers start from it
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _export(model: nn.Module, name: str | None, prompt_format: dict | None) -> tuple[dict, dict, dict]:
    """(config_json, tensors, peftkit metadata) of adapter `name` (default: the active one)."""
    name = resolve_name(model, name)
    method = get_method(adapters(model)[name].method)
    config_json, tensors = method.export(model, name)
    config_json = {**config_json, "base_model_name_or_path": base_model_id(model)}
    meta = {
        "method": method.name,
        "adapter_name": name,
        "prompt_format": prompt_format or prompt_format_of(model),
        "base_model_note": base_model_note(model),
    }
    quantization = quantization_record(model)
    if quantization is not None:  # the base it was trained over (qlora): `peftkit merge` reproduces it
        meta["quantization"] = quantization
    return config_json, tensors, meta


def write_adapter_folder(path: str | os.PathLike, config_json: dict, tensors: dict[str, torch.Tensor],
                         meta: dict[str, Any], command: str = "save_adapter") -> Path:
    """The one writer of an adapter folder: adapter_config.json, adapter_model.safetensors and peftkit.json
    (`meta`, stamped with the peftkit version), written atomically (`atomic_dir`) with the marker of `command`.
    Returns the path."""
    with atomic_dir(path, command=command) as tmp:
        write_adapter_files(tmp, config_json, tensors, meta)
    return Path(path)


def write_adapter_files(folder: Path, config_json: dict, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """The three files of an adapter folder, into `folder` (no marker, no swap: the callers' business)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {"peftkit_version": __version__, **meta}
    if meta.get("prompt_format") is not None:
        check_prompt_format(meta["prompt_format"], f"the prompt format to save in {folder.name}/{META_NAME}")
    (folder / CONFIG_NAME).write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    (folder / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    save_tensors(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(config_json, tensors, peftkit metadata) of a saved adapter folder, with clear errors for broken ones."""
    folder = Path(path)
    if not folder.is_dir():
        raise PeftkitError(f"adapter folder {str(folder)!r} does not exist; point --adapter at a saved adapter folder")
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise PeftkitError(f"{str(folder)!r} has no {CONFIG_NAME}; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    config_json = read_json_object(config_file, "a PEFT adapter config")
    if "peft_type" not in config_json:
        raise PeftkitError(f"{config_file} has no peft_type; it is not a PEFT adapter config")
    tensors = _read_weights(folder)
    file = folder / WEIGHTS_NAME if (folder / WEIGHTS_NAME).is_file() else folder / "adapter_model.bin"
    _check_tensors(config_json, tensors, file)
    meta_file = folder / META_NAME
    meta = read_json_object(meta_file, "peftkit's adapter metadata") if meta_file.is_file() else {}
    return config_json, tensors, meta


def _check_tensors(config_json: dict, tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Every tensor floating point and finite, and none in a decoder layer that the config's `layers_to_transform`
    leaves out (PEFT would not load it, while peftkit's methods build their modules from the keys and would)."""
    layers = config_json.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and not (isinstance(layers, list) and all(type(i) is int for i in layers)):
        raise PeftkitError(f"{file.parent / CONFIG_NAME}: layers_to_transform must be a layer index or a list of "
                           f"them (or null), got {layers!r}")
    for key, tensor in tensors.items():
        what = f"adapter file {str(file)!r}: tensor {key!r}"
        if not tensor.is_floating_point():
            raise PeftkitError(f"{what} is {str(tensor.dtype).removeprefix('torch.')}; adapter weights are floating "
                               "point (float32, bfloat16 or float16): the file is damaged or not an adapter")
        check_finite(tensor, what, "the adapter is broken (did its training diverge?)")
        layer = layer_index(key)
        if layers is not None and layer is not None and layer not in layers:
            raise PeftkitError(f"{what} is in layer {layer}, which the config's layers_to_transform {layers} leaves "
                               "out (PEFT would not load it): the config or the weights were changed apart")


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Tensors of adapter_model.safetensors (or, failing that, a .bin read with weights_only=True: a pickle holding
    anything but tensors is refused by torch's restricted unpickler, never run). Errors are one line."""
    from pickle import UnpicklingError

    weights = folder / WEIGHTS_NAME
    legacy = folder / "adapter_model.bin"
    loaders: list[tuple[Path, Callable[[str], Any]]] = [
        (weights, lambda f: load_file(f)),
        (legacy, lambda f: torch.load(f, map_location="cpu", weights_only=True)),
    ]
    for file, loader in loaders:
        if file.is_file():
            try:
                return loader(str(file))
            except UnpicklingError:
                raise PeftkitError(f"{file} cannot be read as tensors only: it is damaged or holds other Python "
                                   "objects, which peftkit does not unpickle because unpickling can run code; use an "
                                   "adapter_model.safetensors from a source you trust") from None
            except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupted file
                reason = " ".join(str(exc).split())
                raise PeftkitError(f"{file} is corrupted or not a weights file ({type(exc).__name__}: {reason})") from None
    raise PeftkitError(f"{str(folder)!r} has no {WEIGHTS_NAME}; the adapter folder is incomplete")


def adapter_base_model(path: str | os.PathLike) -> str | None:
    """The base model an adapter (its adapter_config.json) or a full fine-tune's folder (the peftkit.json
    `save_model_folder` writes) was trained from, as `load_model` accepts it (the embedded model maps to None)."""
    config_file, meta_file = Path(path) / CONFIG_NAME, Path(path) / META_NAME
    if config_file.is_file():
        base = read_json_object(config_file, "a PEFT adapter config").get("base_model_name_or_path")
    elif meta_file.is_file():
        base = read_json_object(meta_file, "peftkit's model metadata").get("base_model_name_or_path")
    else:
        return None
    return None if base in (None, EMBEDDED_HUB_ID) else base


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> nn.Module:
    """Load a saved adapter (peftkit or HF PEFT) into `model` in place as adapter `name`; it becomes active.

    The method is chosen by the saved `peft_type`. Every tensor is checked against the model before anything is
    injected: a tensor for a module the model lacks, or of the wrong shape, is an error naming it.
    """
    config_json, tensors, meta = read_adapter(path)
    method = method_for_peft_type(config_json["peft_type"])
    name = name or "default"
    if name in adapters(model):
        raise PeftkitError(f"the model already has an adapter named {name!r}; pass another name")
    method.load(model, config_json, tensors, name)
    if meta.get("prompt_format"):  # none recorded (null, {}): the tokenizer's template is used
        set_prompt_format(model, check_prompt_format(meta["prompt_format"], str(Path(path) / META_NAME)))
    return model

