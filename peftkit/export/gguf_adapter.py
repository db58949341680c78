"""A LoRA adapter folder -> a llama.cpp LoRA adapter (GGUF), written with the `gguf` package.

It writes what llama.cpp's convert_lora_to_gguf.py writes: the metadata `general.architecture`, `general.type` =
"adapter", `adapter.type` = "lora", `adapter.lora.alpha` (float32), `general.name`, `general.quantization_version`;
for every adapted linear layer the tensors `<gguf name>.lora_a` (A, [r, d_in]) and `<gguf name>.lora_b` (B,
[d_out, r]), float32, named through gguf's `TensorNameMap` (model.layers.0.self_attn.q_proj -> blk.0.attn_q.weight),
in the order of the adapter's keys. Like the converter, B of q_proj / k_proj in Llama-family models gets the
row permutation llama.cpp applies to those weights (its RoPE layout).

llama.cpp applies alpha / r_m to a module whose tensors have rank r_m, and reads no rank_pattern / alpha_pattern;
HF PEFT applies alpha_m / r_m (or alpha_m / sqrt(r_m) with rsLoRA). Where the two differ, the ratio is folded into
that module's B, so the GGUF applies exactly PEFT's deltas (the converter would apply them at the wrong strength).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from peftkit.errors import PeftkitError
from peftkit.io.adapters import read_adapter
from peftkit.io.fs import read_json_object, refuse_protected
from peftkit.io.models import EMBEDDED_HUB_ID
from peftkit.io.outputs import refuse_inputs
from peftkit.io.shards import open_checkpoint, resolve_base, shapes
from peftkit.methods.lora.format import lora_config_from_json, parse_keys, saved_module_names

log = logging.getLogger(__name__)

# HF model_type -> (gguf architecture, whether llama.cpp permutes q_proj / k_proj rows); the converter's choices.
ARCHITECTURES = {
    "llama": ("LLAMA", True),
    "mistral": ("LLAMA", True),
    "qwen2": ("QWEN2", False),
    "qwen3": ("QWEN3", False),
    "gemma": ("GEMMA", False),
}


def permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order: within each head, interleaved rotary halves become contiguous
    ([heads, 2, d/2] -> [heads, d/2, 2] over the output rows)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def base_config(adapter_config: dict, base: str | os.PathLike | None) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(the base model's config.json, {weight name: shape} from its safetensors headers): from `base`, else from the
    adapter's base_model_name_or_path (a local folder, the embedded model or a hub id in the local cache). An adapter
    trained on the embedded model records its hub id, which names the embedded model here as everywhere else
    (`io.adapters.adapter_base_model`)."""
    recorded = adapter_config.get("base_model_name_or_path")
    folder = resolve_base(str(base) if base is not None else None if recorded == EMBEDDED_HUB_ID else recorded)
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise PeftkitError(f"base model folder {str(folder)!r} has no config.json; give --base with the base model")
    config = read_json_object(path, "a model config")
    return config, {key: shape for key, (shape, _) in shapes(open_checkpoint(Path(folder))).items()}


def _check_fits(module: str, a: torch.Tensor, b: torch.Tensor, weights: dict[str, tuple[int, ...]], where: str) -> None:
    """The LoRA factors of `module` fit the base's weight (out x in); else the adapter is for another base."""
    shape = weights.get(f"{module}.weight")
    if shape is None:
        raise PeftkitError(f"{where}: the base has no weight {module}.weight for the adapted module {module!r}; "
                           "give --base with the model the adapter was trained on")
    if len(shape) != 2 or (b.shape[0], a.shape[1]) != tuple(shape):
        raise PeftkitError(f"{where}: module {module!r} updates a {b.shape[0]}x{a.shape[1]} weight but the base's is "
                           f"{'x'.join(map(str, shape))}; give --base with the model the adapter was trained on")


def gguf_lora_tensors(adapter: str | os.PathLike, config: dict,
                      weights: dict[str, tuple[int, ...]]) -> tuple[float, list[tuple[str, torch.Tensor]]]:
    """(alpha, [(gguf name, float32 tensor)]) for the LoRA adapter folder `adapter` on a base of `config` whose
    weights have the shapes `weights` (each module's factors checked against them)."""
    import gguf

    config_json, tensors, _ = read_adapter(adapter)
    where = f"adapter {str(adapter)!r}"
    why = _unsupported(config_json, tensors)
    if why:
        raise PeftkitError(f"{where} cannot be written as a llama.cpp adapter: {why}")
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise PeftkitError(f"peftkit writes GGUF adapters for {', '.join(sorted(ARCHITECTURES))} models, not "
                           f"{model_type!r}; use llama.cpp's convert_lora_to_gguf.py for other architectures")
    arch_name, permute = ARCHITECTURES[model_type]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch_name], config["num_hidden_layers"])
    keys = parse_keys(tensors)
    lora = lora_config_from_json(config_json, keys, where=where)
    assert lora.lora_alpha is not None  # LoraConfig resolves None (2 x r) when it is made
    alpha = float(lora.lora_alpha)
    out = []
    for module, slots in keys.items():
        a, b = tensors[slots["A"]].float(), tensors[slots["B"]].float()
        _check_fits(module, a, b, weights, where)
        r, alpha_m = lora.rank_alpha(module)
        peft_scale = alpha_m / math.sqrt(r) if lora.use_rslora else alpha_m / r
        if peft_scale != alpha / r:  # fold PEFT's own scale in, so llama.cpp's alpha / r applies it
            b = b * (peft_scale * r / alpha)
        hf_name = f"{module}.weight"
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise PeftkitError(f"{where}: module {module!r} has no llama.cpp tensor name for {arch_name.lower()}")
        if permute and module.endswith(("q_proj", "k_proj")):
            heads = config["num_attention_heads"]
            if module.endswith("k_proj"):
                heads = config.get("num_key_value_heads") or heads
            b = permute_rows(b, heads)
        out += [(f"{name}.lora_a", a.contiguous()), (f"{name}.lora_b", b.contiguous())]
    return alpha, out


def _unsupported(config_json: dict, tensors: dict) -> str | None:
    """Why llama.cpp cannot apply this adapter, or None."""
    if config_json.get("peft_type") != "LORA":
        return f"it is {config_json.get('peft_type')}, and llama.cpp applies only LoRA adapters"
    if config_json.get("use_dora"):
        return "it is DoRA (use_dora), which llama.cpp does not implement"
    if saved_module_names(config_json):
        return "it carries whole modules (modules_to_save), which a llama.cpp adapter cannot replace"
    if any(k.endswith(".lora_B.bias") for k in tensors):
        return "it has lora_B biases (lora_bias), which llama.cpp adapters cannot hold"
    if any(".lora_embedding_" in k for k in tensors):
        return "it adapts embeddings (lora_embedding_A/B); use llama.cpp's converter for those"
    return None


def export_gguf_adapter(adapter: str | os.PathLike, output: str | os.PathLike, *, base: str | os.PathLike | None = None,
                        overwrite: bool = False) -> Path:
    """Write the LoRA adapter folder `adapter` as the llama.cpp adapter file `output` (see the module docstring)."""
    import gguf

    target = check_file_output(output, overwrite, inputs=[adapter, base if base and Path(base).exists() else None])
    config_json, _, _ = read_adapter(adapter)
    config, weights = base_config(config_json, base)
    alpha, tensors = gguf_lora_tensors(adapter, config, weights)
    arch_name, _ = ARCHITECTURES[config["model_type"]]
    tmp = temporary_file(target)
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch_name]])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_name(Path(adapter).resolve().name)
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, tensor in tensors:
            writer.add_tensor(name, tensor.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def check_file_output(output: str | os.PathLike, overwrite: bool,
                      inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """A .gguf output file in an existing folder, not inside the command's `inputs`; an existing one is replaced only
    with --overwrite and only when it is a GGUF file (so no input, folder or foreign file is ever replaced)."""
    target = Path(output).expanduser()
    if target.suffix != ".gguf":
        raise PeftkitError(f"output {str(output)!r} must be a file name ending in .gguf")
    refuse_protected(target.resolve(), str(output))
    refuse_inputs(target.resolve(), str(output), inputs)
    if not target.parent.is_dir():
        raise PeftkitError(f"the folder of output {str(output)!r} does not exist; create it first")
    if target.is_symlink() or target.exists():
        if not overwrite:
            raise PeftkitError(f"output {str(output)!r} already exists; pass --overwrite to replace it")
        if target.is_symlink() or not target.is_file() or target.open("rb").read(4) != b"GGUF":
            raise PeftkitError(f"output {str(output)!r} is not a GGUF file; --overwrite replaces only GGUF files")
    return target


def temporary_file(target: Path) -> Path:
    """A new empty file beside `target` for the write before the rename, made exclusively (O_EXCL) under a name
    no one can guess: a link planted at a predictable name (`.NAME.tmp-PID`) would be written through."""
    fd, name = tempfile.mkstemp(prefix=f".{target.stem}.tmp-{os.getpid()}-", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    return Path(name)
