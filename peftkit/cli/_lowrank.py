"""What `compress` and `convert` share: the options that cut a weight delta down to a LoRA, and the report printer.

Both commands end in `merging.compress.write_lowrank` and return its `CompressReport`; the printer shows a summary,
the modules with the largest error (every module with `--verbose`) and the energy each keeps.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated

import typer

from peftkit.cli._options import print_json

if TYPE_CHECKING:
    from peftkit.merging.compress import CompressReport, ModuleRow

WORST_SHOWN = 10  # modules listed without --verbose

LowRank = Annotated[int | None, typer.Option("--rank", "-r", help="Fixed rank per module.")]
Energy = Annotated[float | None, typer.Option("--energy", help="Smallest rank keeping this share of ||delta||_F^2, in (0, 1], chosen per module.")]
MaxRank = Annotated[int | None, typer.Option("--max-rank", help="Upper bound on any module's rank.")]
NoSizeCap = Annotated[bool, typer.Option("--no-size-cap", help="Allow ranks past m*n/(m+n), where a LoRA is larger than the dense delta.")]
KeepNonlinear = Annotated[bool, typer.Option("--keep-nonlinear/--drop-nonlinear", help="Keep norm / embedding / bias deltas (modules_to_save, lora_B.bias) or drop them (reported either way).")]
Verbose = Annotated[bool, typer.Option("--verbose", help=f"Print every module's row, not only the {WORST_SHOWN} with the largest error.")]


def _error_key(row: ModuleRow) -> float:
    """Sort key, largest error first; a non-finite error sorts first."""
    return -row.rel_error if math.isfinite(row.rel_error) else -math.inf


def print_report(report: CompressReport, output: str, verbose: bool, as_json: bool = False) -> None:
    """The per-module table (rank, relative error, energy kept), the summary, the non-linear deltas and the sizes;
    with `as_json` the whole report as JSON instead."""
    from rich.console import Console
    from rich.table import Table

    if as_json:
        print_json(asdict(report))
        return

    console = Console()
    every = verbose or len(report.rows) <= WORST_SHOWN
    rows = report.rows if every else sorted(report.rows, key=_error_key)[:WORST_SHOWN]
    if rows:
        if not every:  # a line of its own: a table title would wrap to the table's width
            console.print(f"the {WORST_SHOWN} modules with the largest error (all {len(report.rows)}: --verbose):")
        table = Table("module", "shape", "rank", "rel. error", "energy kept", "note")
        for row in rows:
            table.add_row(row.module, "x".join(map(str, row.shape)), str(row.rank), f"{row.rel_error:.4f}", f"{row.energy:.4f}", row.note)
        console.print(table)
    ranks = sorted({row.rank for row in report.rows}) or [0]
    rank_range = f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else str(ranks[0])
    capped = sum(1 for row in report.rows if row.note)
    capped_note = f" ({capped} capped: see the note column{'' if every else ' with --verbose'})" if capped else ""
    console.print(f"{len(report.rows)} modules compressed, rank {rank_range}{capped_note}; "
                  f"total relative Frobenius error over compressed modules: {report.total_rel_error:.4f}")
    if report.other:
        kept = sum(1 for o in report.other if o["kept"])
        console.print(f"{len(report.other)} non-linear tensors changed (norms, embeddings, biases): "
                      f"{'kept ' + str(kept) if kept else 'DROPPED (use --keep-nonlinear to keep them)'}")
        largest = sorted(report.other, key=lambda o: -o["rel_change"])
        for info in largest if verbose else largest[:WORST_SHOWN]:
            console.print(f"  {info['tensor']}: relative change {info['rel_change']:.2e}, {info['kept'] or 'dropped'}")
    console.print(f"adapter {report.adapter_bytes / 1e6:.2f} MB vs {report.source} {report.source_bytes / 1e6:.2f} MB "
                  f"(10^6 bytes; {report.adapter_bytes / max(report.source_bytes, 1):.1%}) in {report.seconds:.1f} s -> {output}")
