"""`peftkit combine`: several LoRA adapters -> one saved LoRA adapter (concat exact, or SVD to a rank)."""

from __future__ import annotations

from typing import Annotated

import typer

from peftkit.cli._app import app
from peftkit.cli._options import Adapters, Combination, Json, Output, Overwrite, Weights, print_json
from peftkit.errors import PeftkitError


@app.command("combine")
def combine_cmd(
    adapter: Adapters = None,
    output: Output = None,
    weights: Weights = None,
    combination: Combination = "concat",
    rank: Annotated[int | None, typer.Option("--rank", "-r", help="Rank of the result for --combination svd.")] = None,
    overwrite: Overwrite = False,
    as_json: Json = False,
) -> None:
    """Combine LoRA adapters, weighted, into one adapter: concat / linear (exact, rank Σr) or svd (rank --rank)."""
    from peftkit.merging.deltas import combine, parse_weights, read_lora, write_lora

    adapters = adapter or []
    if len(adapters) < 2:
        raise PeftkitError("give two or more --adapter folders to combine")
    if not output:
        raise PeftkitError("give --output DIR for the combined adapter")
    parts = [read_lora(a, w) for a, w in zip(adapters, parse_weights(weights, len(adapters)), strict=True)]
    combined = combine(parts, combination, rank)
    write_lora(combined, output, overwrite=overwrite)
    ranks = [d.a.shape[0] for d in combined.deltas.values()]
    info = {"output": output, "combination": combination, "modules": len(ranks), "max_rank": max(ranks)}
    if as_json:
        print_json(info)
        return
    note = " (linear on the deltas is stored exactly as a concatenation)" if combination == "linear" else ""
    print(f"combined {len(adapters)} adapters ({combination}{note}) into {output}: {len(ranks)} modules, rank up to {max(ranks)}")
