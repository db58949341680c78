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
    as_json: Json = False,
) -> None:
    """Merge LoRA adapters into the base weights and write a new model folder (loads with from_pretrained)."""
    from peftkit.io.checkpoint import limit_heap_growth
    from peftkit.merging.deltas import parse_weights

    if not output:
        raise PeftkitError("give --output DIR for the merged model")
    limit_heap_growth()
    adapters = adapter or []
    report = merge_to_disk(base, adapters, output, weights=weights, combination=combination, rank=rank,
                           dtype=dtype, overwrite=overwrite)
    if check_logits:
        from peftkit.merging.check import check_logits as run_check

        report.logits_max_abs_diff = run_check(base, adapters, output, parse_weights(weights, len(adapters)), combination, rank)
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
    if report.logits_max_abs_diff is not None:
        print(f"  --check-logits: max |logit difference| vs base + adapter unmerged: {report.logits_max_abs_diff:.2e}")
