"""Full fine-tune -> LoRA adapter: truncated SVD of each linear layer's weight delta (streamed, tensor by tensor).

For every linear weight (nn.Linear, GPT-2 Conv1D), in fp32: Δ = W_ft − W_base ([out, in]); keep the top r singular
triplets (`svd.py`: exact where that costs little, i.e. small matrices or r a large share of min(m, n); else
randomized with q = 2r, niter 2, fixed seed); A = √S Vᵀ, B = U √S, written at one rank (the largest,
zero-padded: `format.one_rank` says why) with alpha = r (scale 1). The rank is fixed (--rank) or the smallest
keeping a share `energy` of ‖Δ‖²_F (--energy), never above --max-rank nor above m·n/(m+n), where a LoRA stops
being smaller than the dense delta (lift that cap with size_cap=False, e.g. to reproduce a fine-tune exactly).

Deltas of everything else (norms, embeddings, biases) cannot be a LoRA: they are always reported and, with
keep_nonlinear, kept the way PEFT keeps them: whole modules in `modules_to_save`, and bias deltas as `lora_B.bias`
(`lora_bias`) when every adapted layer has a bias (else the biased module is kept whole). Never silently dropped.

Base and fine-tune tensors must be finite, and so must every adapter tensor once cast to the output dtype
(`finite.py`); otherwise nothing is written.

`write_lowrank` is that whole step from (key, before, after) tensor pairs to the adapter folder; `compress` streams
the pairs from two checkpoints, `convert.py` from an adapter folded into its base in memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.core.method import PEFT_PREFIX
from peftkit.errors import PeftkitError
from peftkit.io.adapters import WEIGHTS_NAME, write_adapter_folder
from peftkit.io.finite import cast_checked, check_finite
from peftkit.io.models import EMBEDDED_HUB_ID, resolve_dtype
from peftkit.io.outputs import check_output
from peftkit.io.shards import (
    TORCH_DTYPES,
    Checkpoint,
    iter_tensors,
    open_checkpoint,
    read_tensor,
    resolve_base,
    shapes,
)
from peftkit.merging.svd import check_rank_energy, dense_cap, energy_svd, relative_error, top_svd
from peftkit.methods.lora.format import lora_tensors, one_rank, scale_one_config, target_modules_for
from peftkit.methods.lora.inits import split_factors


@dataclass
class ModuleRow:
    """One line of the compress table."""

    module: str
    shape: tuple[int, int]
    rank: int
    rel_error: float
    energy: float
    note: str = ""


@dataclass
class CompressReport:
    rows: list[ModuleRow] = field(default_factory=list)
    other: list[dict] = field(default_factory=list)  # non-linear deltas: {"tensor", "rel_change", "kept"}
    total_rel_error: float = 0.0  # over the compressed modules: ‖Δ − Δ_r‖_F / ‖Δ‖_F summed over modules
    adapter_bytes: int = 0
    source_bytes: int = 0  # what was compressed: the fine-tune's shards, or (convert) the source adapter's file
    source: str = "full fine-tune"  # named in the summary line
    seconds: float = 0.0


def _module_of(key: str, meta: nn.Module) -> tuple[str, nn.Module | None]:
    """(module path, module) of checkpoint key "<path>.<param>", trying without the base prefix too."""
    path = key.rsplit(".", 1)[0]
    prefix = getattr(meta, "base_model_prefix", "")
    for candidate in (path, f"{prefix}.{path}"):
        try:
            return candidate, meta.get_submodule(candidate)
        except AttributeError:
            continue
    return path, None


def _check_same(base: dict, ft: dict) -> None:
    """Base and fine-tune must hold the same tensors with the same shapes (name the first that differs)."""
    for key in sorted(set(base) | set(ft)):
        if key not in ft or key not in base:
            where = "fine-tune" if key not in ft else "base"
            raise PeftkitError(f"tensor {key!r} is missing from the {where}; base and fine-tune are different architectures")
        if base[key][0] != ft[key][0]:
            raise PeftkitError(f"tensor {key!r} has shape {base[key][0]} in the base but {ft[key][0]} in the fine-tune; "
                               "they are different models")


def compress(base: str | None, finetuned: str, output: str, *, rank: int | None = None, energy: float | None = None,
             max_rank: int | None = None, size_cap: bool = True, keep_nonlinear: bool = False,
             dtype: str | None = None, overwrite: bool = False) -> CompressReport:
    """Write a PEFT LoRA adapter at `output` approximating `finetuned` − `base`; see the module docstring."""
    start = time.perf_counter()
    cut = Cut(rank, energy, max_rank, size_cap, keep_nonlinear)
    base_dir, ft_dir = resolve_base(base), resolve_base(finetuned)
    check_output(output, overwrite, inputs=[base_dir, ft_dir])
    base_ck, ft_ck = open_checkpoint(base_dir), open_checkpoint(ft_dir)
    ft_shapes = shapes(ft_ck)
    _check_same(shapes(base_ck), ft_shapes)
    from transformers import AutoConfig

    from peftkit.core.counting import meta_model

    meta = meta_model(AutoConfig.from_pretrained(ft_dir))
    ft_dtype = resolve_dtype(dtype) or TORCH_DTYPES.get(next(iter(ft_shapes.values()))[1], torch.float32)
    report = CompressReport(source_bytes=sum((ft_dir / s).stat().st_size for s in ft_ck.shards))
    write_lowrank(_checkpoint_pairs(base_ck, ft_ck), _reader(ft_ck), meta, output, cut, report,
                  dtype=ft_dtype, base_model=EMBEDDED_HUB_ID if base is None else base,
                  meta={"method": "lora", "compressed_from": str(finetuned)}, command="compress")
    report.seconds = time.perf_counter() - start
    return report


@dataclass(frozen=True)
class Cut:
    """How each module's delta becomes a LoRA: a fixed `rank` or the smallest keeping a share `energy` of its
    ‖Δ‖²_F (exactly one), never above `max_rank` nor (with `size_cap`) m·n/(m+n); `keep_nonlinear`: keep the
    deltas that are not a linear weight (whole modules, lora_B.bias) instead of dropping them (reported either way).
    Checked when made, so a bad value is refused before any model is read."""

    rank: int | None = None
    energy: float | None = None
    max_rank: int | None = None
    size_cap: bool = True
    keep_nonlinear: bool = False

    def __post_init__(self) -> None:
        check_rank_energy(self.rank, self.energy)
        if self.max_rank is not None and self.max_rank <= 0:
            raise PeftkitError(f"--max-rank must be a positive integer, got {self.max_rank}")


Pairs = Iterable[tuple[str, torch.Tensor, torch.Tensor]]  # ("<module path>.<param>", before, after), finite


def write_lowrank(pairs: Pairs, read: Callable[[str], torch.Tensor], model: nn.Module, output: str, cut: Cut,
                  report: CompressReport, *, dtype: torch.dtype, base_model: str | None, meta: dict,
                  command: str) -> None:
    """The one way a set of weight changes becomes a LoRA adapter folder (`compress`, `convert`): every changed
    linear weight of `pairs` is cut by SVD (`cut`), the rest reported (and kept with cut.keep_nonlinear: `read`
    gives a changed module's parameter by its full key), the tensors cast to `dtype` (checked finite), and the folder
    written atomically at `output` with `meta` in peftkit.json. `model` (a meta-device one will do) names the
    modules. Fills `report`'s rows, other and adapter_bytes."""
    factors = _compress_all(pairs, model, report, cut)
    tensors, saved, lora_bias = _kept(factors, read, model, report, cut.keep_nonlinear)
    tensors = {k: cast_checked(v, dtype, f"adapter tensor {k!r}", "nothing was written").contiguous()
               for k, v in tensors.items()}
    ranks = {m: f[0].shape[0] for m, f in factors.items()}
    if not ranks:
        raise PeftkitError("no linear layer's weight changed; there is nothing to compress into a LoRA")
    conv1d = any(isinstance(model.get_submodule(m), Conv1D) for m in ranks)
    linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    targets = target_modules_for(list(ranks), adaptable=linear)
    config = scale_one_config(max(ranks.values()), targets, base_model=base_model, lora_bias=lora_bias,
                              modules_to_save=sorted(saved) or None, fan_in_fan_out=conv1d)
    folder = write_adapter_folder(output, config, tensors, meta, command=command)
    report.adapter_bytes = (folder / WEIGHTS_NAME).stat().st_size


_BROKEN = "a checkpoint with NaN / inf weights has no meaningful delta to compress"


def _checkpoint_pairs(base_ck: Checkpoint, ft_ck: Checkpoint) -> Pairs:
    """(key, base tensor, fine-tuned tensor) streamed over the fine-tune's shards, each checked finite."""
    for shard in ft_ck.shards:
        for key, w_ft in iter_tensors(ft_ck, shard):
            w_base = read_tensor(base_ck, key)  # one mapping per tensor: see merge_io.iter_tensors
            check_finite(w_ft, f"the fine-tune's tensor {key!r} ({ft_ck.folder / shard})", _BROKEN)
            check_finite(w_base, f"the base's tensor {key!r} ({base_ck.folder / base_ck.key_to_shard[key]})", _BROKEN)
            yield key, w_base, w_ft


def _compress_all(pairs: Pairs, meta: nn.Module, report: CompressReport, cut: Cut) -> dict[str, list]:
    """SVD every changed linear weight of `pairs`. Returns {module: [A, B, bias delta or None]}."""
    factors: dict[str, list] = {}
    bias_deltas: dict[str, torch.Tensor] = {}
    num = den = 0.0
    for key, w_base, w_ft in pairs:
        if not w_ft.is_floating_point() or torch.equal(w_ft, w_base):
            continue
        delta = w_ft.float() - w_base.float()
        path, module = _module_of(key, meta)
        if isinstance(module, (nn.Linear, Conv1D)) and key.endswith(".weight"):
            d = delta.T if isinstance(module, Conv1D) else delta  # [out, in]
            a, b, row = _compress_one(path, d, cut)
            factors.setdefault(path, [None, None, None])[:2] = [a, b]
            report.rows.append(row)
            sq = float(d.double().pow(2).sum())
            num, den = num + row.rel_error**2 * sq, den + sq
        else:
            if key.endswith(".bias"):
                bias_deltas[key] = delta
            rel = float(delta.norm() / w_base.float().norm().clamp_min(1e-30))
            report.other.append({"tensor": key, "module": path, "rel_change": rel, "kept": False})
    report.total_rel_error = (num / den) ** 0.5 if den else 0.0
    for info in report.other:  # bias deltas of compressed layers travel with their LoRA
        if info["tensor"] in bias_deltas and info["module"] in factors:
            factors[info["module"]][2] = bias_deltas[info["tensor"]]
    return factors


def _reader(ck: Checkpoint) -> Callable[[str], torch.Tensor]:
    """Reads the checkpoint's tensor of a full module key (a checkpoint may store keys without the base prefix)."""
    keys = set(ck.key_to_shard)
    return lambda key: read_tensor(ck, key if key in keys else key.split(".", 1)[1])


def _compress_one(path: str, d: torch.Tensor, cut: Cut) -> tuple:
    """(A, B, table row) for one [out, in] delta."""
    m, n = d.shape
    limits = {"min(m, n)": min(m, n)}
    if cut.size_cap:
        limits["m·n/(m+n), past which a LoRA is bigger than the dense delta"] = dense_cap(m, n)
    if cut.max_rank is not None:
        limits["--max-rank"] = cut.max_rank
    why, limit = min(limits.items(), key=lambda kv: kv[1])
    rank, energy = cut.rank, cut.energy
    u, s, vh = energy_svd(d, energy, limit) if energy is not None else top_svd(d, min(rank or limit, limit))
    err, kept = relative_error(d, s)
    wanted_more = (rank is not None and rank > limit) or (energy is not None and kept < energy - 1e-9)
    note = f"capped at {limit} by {why}" if wanted_more and len(s) == limit else ""
    a, b = split_factors(u, s, vh)
    return a, b, ModuleRow(path, (m, n), len(s), err, kept, note)


def _kept(factors: dict, read: Callable[[str], torch.Tensor], meta: nn.Module, report: CompressReport,
          keep: bool) -> tuple[dict, set, bool]:
    """Adapter tensors: LoRA factors, plus (keep) lora_B.bias and whole modules for modules_to_save.

    A layer with a bias delta but no way to carry it as lora_B.bias (some adapted layer has no bias, as in Qwen2)
    is kept whole instead of as a LoRA: exact, but dense.
    """
    with_bias = [m for m, f in factors.items() if f[2] is not None]
    lora_bias = keep and bool(with_bias) and all(getattr(meta.get_submodule(m), "bias", None) is not None for m in factors)
    saved: set[str] = set()
    if keep:
        for info in report.other:
            module = info["module"]
            info["kept"] = "lora_B.bias" if module in factors and lora_bias else "modules_to_save"
            if info["kept"] == "modules_to_save":
                saved.add(module)
    for module in saved & set(factors):
        del factors[module]
        for row in report.rows:
            if row.module == module:
                row.note, row.rank, row.rel_error, row.energy = "kept whole (bias delta, no lora_bias)", 0, 0.0, 1.0
    kept = {m: (a, b, bias if lora_bias else None) for m, (a, b, bias) in factors.items()}
    tensors = lora_tensors(one_rank(kept)[0] if kept else {}, lora_bias)
    for module in saved:  # PEFT saves every parameter of a kept module, changed or not
        for name, _ in meta.get_submodule(module).named_parameters(recurse=False):
            key = f"{module}.{name}"
            tensors[f"{PEFT_PREFIX}{key}"] = read(key).float()
    return tensors, saved, lora_bias
