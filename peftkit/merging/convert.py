"""Any adapter that folds into the base weights, or a full fine-tune, -> a plain PEFT LoRA (`peftkit convert`), so
runtimes that load only LoRA (vLLM, llama.cpp, TGI) can serve a DoRA, IA3, ... adapter.

No method is named here. The base is loaded in fp32 and the adapter applied through the registry (the method of its
`peft_type`, which must be `mergeable`); then each adapter layer is folded into the module it wraps through the
`AdapterLayer` contract: `unload([])` is the wrapped module as it is, `unload(names)` the module with the adapters
folded in (changed in place, or for a module kept whole, its copy). The parameters that change (after − before, in
fp32) are the weight delta of a fine-tune, only in memory, so `compress.write_lowrank`, the SVD and writer behind
`peftkit compress`, turns them into the LoRA: one rank or the rank keeping a share of each module's ‖Δ‖²_F
(`--energy`), the energy each module keeps reported. A full fine-tune's folder goes to `compress` itself.

At full rank (no size cap, a rank >= each module's min(m, n)) the LoRA computes what the adapter did up to fp32
rounding. Deltas that are no linear weight (a bias an IA3 vector scales, a module kept whole) are handled as
compress handles them: reported, dropped or (keep_nonlinear) kept. Holds the base in fp32 (4 bytes a parameter).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from peftkit.core.inject import replace_module
from peftkit.core.method import AdapterLayer
from peftkit.core.registry import method_for_peft_type
from peftkit.core.state import adapter_layers
from peftkit.errors import PeftkitError
from peftkit.io.adapters import CONFIG_NAME, WEIGHTS_NAME, adapter_base_model, read_adapter
from peftkit.io.models import resolve_dtype
from peftkit.io.outputs import check_output
from peftkit.io.shards import resolve_base
from peftkit.merging.compress import CompressReport, Cut, Pairs, compress, write_lowrank

FORMATS = ("lora",)  # what `--to` accepts: the one format every runtime loads


def convert(source: str, output: str, *, base: str | None = None, to: str = "lora", rank: int | None = None,
            energy: float | None = None, max_rank: int | None = None, size_cap: bool = True,
            keep_nonlinear: bool = False, dtype: str | None = None, overwrite: bool = False) -> CompressReport:
    """Write the LoRA of adapter folder (or full fine-tune folder) `source` at `output`; `base` defaults to the
    base `source` records. See the module docstring; `Cut` says what rank, energy, max_rank and size_cap mean."""
    start = time.perf_counter()
    if to not in FORMATS:
        raise PeftkitError(f"--to must be one of {', '.join(FORMATS)} (the format vLLM, llama.cpp and TGI load); got {to!r}")
    cut = Cut(rank, energy, max_rank, size_cap, keep_nonlinear)
    folder = Path(source)
    base_id = base if base is not None else adapter_base_model(folder)  # None: the embedded model
    if (folder / "config.json").is_file() and not (folder / CONFIG_NAME).is_file():  # a whole model: its delta
        return compress(base_id, source, output, rank=rank, energy=energy, max_rank=max_rank, size_cap=size_cap,
                        keep_nonlinear=keep_nonlinear, dtype=dtype, overwrite=overwrite)
    if not folder.is_dir():
        raise PeftkitError(f"{source!r} is not a folder; give an adapter folder or a full fine-tune's model folder")
    config_json, tensors, meta = read_adapter(folder)
    method = method_for_peft_type(config_json["peft_type"])
    if not method.mergeable:
        raise PeftkitError(f"a {method.name} adapter cannot be converted to a LoRA: {method.why_not_mergeable} Only "
                           "an adapter that folds into the base weights has a weight delta to convert")
    base_dir = resolve_base(base_id)
    check_output(output, overwrite, inputs=[base_dir, folder])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    method.load(model, config_json, tensors, "default")
    report = CompressReport(source_bytes=(folder / WEIGHTS_NAME).stat().st_size, source=f"{method.name} adapter")
    kept_meta = {key: meta[key] for key in ("prompt_format", "base_model_note") if meta.get(key)}
    write_lowrank(folded_pairs(model), model.get_parameter, model, output, cut, report,
                  dtype=resolve_dtype(dtype) or _float_dtype(tensors),
                  base_model=config_json.get("base_model_name_or_path") if base is None else base,
                  meta={"method": "lora", "converted_from": str(source), "source_method": method.name, **kept_meta},
                  command="convert")
    report.seconds = time.perf_counter() - start
    return report


def folded_pairs(model: nn.Module) -> Pairs:
    """("<module path>.<param>", before, after) in fp32 for every parameter of every module an adapter wraps, folding
    one adapter layer at a time (so only one module's copy is held); `model` is left with the adapters folded in."""
    for path, layer in list(adapter_layers(model)):
        before = {name: p.detach().float().clone() for name, p in _unload(layer, path, []).named_parameters()}
        folded = _unload(layer, path, layer.adapter_names())
        replace_module(model, path, folded)
        for name, param in folded.named_parameters():
            yield f"{path}.{name}", before[name], param.detach().float()


def _unload(layer: AdapterLayer, path: str, names: list[str]) -> nn.Module:
    """`layer.unload(names)`: the module it wraps, with `names` folded in; refused for a layer that wraps none."""
    module = layer.unload(names)
    if module is None:
        raise PeftkitError(f"{type(layer).__name__} at {path!r} wraps no module, so it has no weight delta to convert; "
                           "only adapters that fold into the modules they wrap can be")
    return module


def _float_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype the source adapter was saved in (its first floating tensor), fp32 if it has none."""
    return next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
