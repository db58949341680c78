"""`peftkit compress`: the weight delta of a full fine-tune -> a PEFT LoRA adapter, by truncated SVD."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from peftkit.cli._app import app
from peftkit.cli._options import Base, Dtype, Json, Output, Overwrite, print_json
from peftkit.errors import PeftkitError
from peftkit.io.checkpoint import limit_heap_growth
from peftkit.merging.compress import CompressReport, compress


@app.command("compress")
def compress_cmd(
    finetuned: Annotated[str, typer.Option("--finetuned", help="The fully fine-tuned model folder (same architecture as --base).")],
    base: Base = None,
    output: Output = None,
    rank: Annotated[int | None, typer.Option("--rank", "-r", help="Fixed rank per module.")] = None,
    energy: Annotated[float | None, typer.Option("--energy", help="Smallest rank keeping this share of ||delta||_F^2, in (0, 1].")] = None,
    max_rank: Annotated[int | None, typer.Option("--max-rank", help="Upper bound on any module's rank.")] = None,
    no_size_cap: Annotated[bool, typer.Option("--no-size-cap", help="Allow ranks past m*n/(m+n), where a LoRA is larger than the dense delta.")] = False,
    keep_nonlinear: Annotated[bool, typer.Option("--keep-nonlinear/--drop-nonlinear", help="Keep norm / embedding / bias deltas (modules_to_save, lora_B.bias) or drop them (reported either way).")] = False,
    dtype: Dtype = None,
    overwrite: Overwrite = False,
    as_json: Json = False,
) -> None:
    """Compress FT - BASE into a LoRA adapter (per-module ranks), with a per-module error table."""
    if not output:
        raise PeftkitError("give --output DIR for the adapter")
    limit_heap_growth()
    report = compress(base, finetuned, output, rank=rank, energy=energy, max_rank=max_rank, size_cap=not no_size_cap,
                      keep_nonlinear=keep_nonlinear, dtype=dtype, overwrite=overwrite)
    if as_json:
        print_json(asdict(report))
        return
    _print(report, output)


def _print(report: CompressReport, output: str) -> None:
    console = Console()
    table = Table("module", "shape", "rank", "rel. error", "energy kept", "note")
    for row in report.rows:
        table.add_row(row.module, "x".join(map(str, row.shape)), str(row.rank), f"{row.rel_error:.4f}", f"{row.energy:.4f}", row.note)
    console.print(table)
    console.print(f"total relative Frobenius error over compressed modules: {report.total_rel_error:.4f}")
    if report.other:
        kept = sum(1 for o in report.other if o["kept"])
        console.print(f"{len(report.other)} non-linear tensors changed (norms, embeddings, biases): "
                      f"{'kept ' + str(kept) if kept else 'DROPPED (use --keep-nonlinear to keep them)'}")
        for info in sorted(report.other, key=lambda o: -o["rel_change"])[:10]:
            console.print(f"  {info['tensor']}: relative change {info['rel_change']:.2e}, {info['kept'] or 'dropped'}")
    console.print(f"adapter {report.adapter_bytes / 1e6:.2f} MB vs full fine-tune {report.finetune_bytes / 1e6:.2f} MB "
                  f"(10^6 bytes; {report.adapter_bytes / max(report.finetune_bytes, 1):.1%}) in {report.seconds:.1f} s -> {output}")
