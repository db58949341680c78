"""`peftkit convert`: an adapter of any method that folds into the weights (DoRA, IA3, ...) or a full fine-tune ->
a plain PEFT LoRA, by truncated SVD of each module's weight delta, for runtimes that load only LoRA.

Prints what `compress` prints: each module's rank, relative error and the share of its delta's energy kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from peftkit.cli._app import app
from peftkit.cli._lowrank import Energy, KeepNonlinear, LowRank, MaxRank, NoSizeCap, Verbose, print_report
from peftkit.cli._options import Dtype, Json, Output, Overwrite
from peftkit.errors import PeftkitError

if TYPE_CHECKING:
    from peftkit.merging.compress import CompressReport


def convert(*args, **kwargs) -> CompressReport:
    """`peftkit.merging.convert.convert`, imported when called (tests replace this name)."""
    from peftkit.merging.convert import convert as run

    return run(*args, **kwargs)


@app.command("convert")
def convert_cmd(
    source: Annotated[str, typer.Argument(metavar="ADAPTER", help="The adapter folder (any method that merges into the weights), or a full fine-tune's model folder.")],
    to: Annotated[str, typer.Option("--to", help="The format to write: lora (what vLLM, llama.cpp and TGI load).")] = "lora",
    base: Annotated[str | None, typer.Option("--base", "--model", "-m", help="Base model: folder or hub id; default: the base the adapter records (the embedded model when none).")] = None,
    output: Output = None,
    rank: LowRank = None,
    energy: Energy = None,
    max_rank: MaxRank = None,
    no_size_cap: NoSizeCap = False,
    keep_nonlinear: KeepNonlinear = False,
    dtype: Dtype = None,
    overwrite: Overwrite = False,
    verbose: Verbose = False,
    as_json: Json = False,
) -> None:
    """Convert an adapter (DoRA, IA3, ...; or a full fine-tune, as `compress` does) into a plain LoRA by SVD of each
    module's weight delta; prints the energy each module keeps. Full rank (--rank past every module's size,
    --no-size-cap) reproduces the adapter."""
    from peftkit.io.shards import limit_heap_growth

    if not output:
        raise PeftkitError("give --output DIR for the LoRA adapter")
    limit_heap_growth()
    report = convert(source, output, base=base, to=to, rank=rank, energy=energy, max_rank=max_rank,
                     size_cap=not no_size_cap, keep_nonlinear=keep_nonlinear, dtype=dtype, overwrite=overwrite)
    print_report(report, output, verbose, as_json)
