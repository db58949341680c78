"""`peftkit compress`: the weight delta of a full fine-tune -> a PEFT LoRA adapter, by truncated SVD.

Prints a summary (modules, rank range, total error, sizes) and the modules with the largest error; `--verbose`
prints the full per-module table, `--json` the whole report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from peftkit.cli._app import app
from peftkit.cli._lowrank import Energy, KeepNonlinear, LowRank, MaxRank, NoSizeCap, Verbose, print_report
from peftkit.cli._options import Base, Dtype, Json, Output, Overwrite
from peftkit.errors import PeftkitError

if TYPE_CHECKING:
    from peftkit.merging.compress import CompressReport


def compress(*args, **kwargs) -> CompressReport:
    """`peftkit.merging.compress.compress`, imported when called (tests replace this name)."""
    from peftkit.merging.compress import compress as run

    return run(*args, **kwargs)


@app.command("compress")
def compress_cmd(
    finetuned: Annotated[str, typer.Option("--finetuned", help="The fully fine-tuned model folder (same architecture as --base).")],
    base: Base = None,
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
    """Compress FT - BASE into a LoRA adapter (per-module ranks); prints a summary and the worst modules."""
    from peftkit.io.shards import limit_heap_growth

    if not output:
        raise PeftkitError("give --output DIR for the adapter")
    limit_heap_growth()
    report = compress(base, finetuned, output, rank=rank, energy=energy, max_rank=max_rank, size_cap=not no_size_cap,
                      keep_nonlinear=keep_nonlinear, dtype=dtype, overwrite=overwrite)
    print_report(report, output, verbose, as_json)
