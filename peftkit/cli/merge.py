"""`peftkit merge`: fold LoRA adapter(s) into a base checkpoint, shard by shard, with bounded memory."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated

import typer

from peftkit.cli._app import app
from peftkit.cli._options import Adapters, Base, Combination, Dtype, Json, Output, Overwrite, Weights, print_json
from peftkit.errors import PeftkitError

if TYPE_CHECKING:
    from peftkit.merging.stream import MergeReport


def merge_to_disk(*args, **kwargs) -> MergeReport:
    """`peftkit.merging.stream.merge_to_disk`, imported when called (tests replace this name)."""
    from peftkit.merging.stream import merge_to_disk as run

    return run(*args, **kwargs)


@app.command("merge")
def merge_cmd(
    base: Base = None,
    adapter: Adapters = None,
    output: Output = None,
    weights: Weights = None,
    combination: Combination = "concat",
    rank: Annotated[int | None, typer.Option("--rank", "-r", help="Rank for --combination svd.")] = None,
    dtype: Dtype = None,
    overwrite: Overwrite = False,
    check_logits: Annotated[bool, typer.Option("--check-logits", help="Also load both models and compare logits (needs the model to fit in memory).")] = False,
    merge_base: Annotated[str | None, typer.Option("--merge-base", help="QLoRA adapters: quantized (default: the de-quantized base they were trained over) | original (the unquantized weights).")] = None,
    base_probe: Annotated[bool, typer.Option("--base-probe/--no-base-probe", help="QLoRA adapters: print the logit difference between the two merge bases on a probe (loads the model twice, one at a time).")] = True,
    as_json: Json = False,
) -> None:
    """Merge LoRA adapters into the base weights and write a new model folder (loads with from_pretrained)."""
    from peftkit.io.shards import limit_heap_growth
    from peftkit.merging.deltas import parse_weights

    if not output:
        raise PeftkitError("give --output DIR for the merged model")
    limit_heap_growth()
    adapters = adapter or []
    report = merge_to_disk(base, adapters, output, weights=weights, combination=combination, rank=rank,
                           dtype=dtype, overwrite=overwrite, merge_base=merge_base)
    if check_logits:
        from peftkit.merging.check import check_logits as run_check

        report.logits_max_abs_diff = run_check(base, adapters, output, parse_weights(weights, len(adapters)),
                                               combination, rank, quant=report.quantization if report.merge_base == "quantized" else None)
    if report.quantization is not None and base_probe:
        from peftkit.merging.check import base_logits_difference

        report.base_logits_diff = base_logits_difference(base, adapters, parse_weights(weights, len(adapters)),
                                                         report.quantization, combination, rank)
    if as_json:
        print_json(asdict(report))
        return
    print(f"merged {len(adapters)} adapter(s) into {report.base_folder} -> {report.output}")
    print(f"  {report.changed} tensors changed in {report.shards} shard(s), {report.bytes_written / 1e9:.3f} GB written "
          f"(10^9 bytes) in {report.seconds:.1f} s")
    print(f"  self-check: worst relative probe error {report.worst_relative_error:.2e} ({report.worst_tensor}), "
          f"tolerance {report.tolerance:.0e}")
    if report.untied_lm_head:
        print("  lm_head was tied to the input embedding: it now has its own merged tensor (tie_word_embeddings=false)")
    _print_merge_base(report)
    if report.logits_max_abs_diff is not None:
        print(f"  --check-logits: max |logit difference| vs base + adapter unmerged: {report.logits_max_abs_diff:.2e}")


def _print_merge_base(report: MergeReport) -> None:
    """For a QLoRA adapter: which base it went into, and how much the other choice would change the logits."""
    q = report.quantization
    if q is None:
        return
    kind = "8-bit int8" if q["bits"] == 8 else f"4-bit {q['quant_type']}" + (" double-quant" if q["double_quant"] else "")
    other = {"quantized": "original (the unquantized weights)", "original": "quantized (the de-quantized base)"}
    print(f"  merge base: {report.merge_base} (the adapter was trained over a {kind} base; --merge-base "
          f"{other[report.merge_base]} is the other choice)")
    if report.base_logits_diff is not None:
        print(f"  probe (8 tokens): max |logit difference| between merging into the de-quantized and the original "
              f"base: {report.base_logits_diff:.3e}")
