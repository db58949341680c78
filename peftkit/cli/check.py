"""`peftkit check`: which runtimes (HF PEFT, vLLM, llama.cpp, TGI) can load an adapter, and why not."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer

from peftkit.cli._app import app
from peftkit.cli._options import Json, print_json

SOME_CANNOT = 3  # exit code when some consumer cannot load the adapter (2 is a usage or input error)
SHOWN = {"yes": "[green]yes[/green]", "needs": "[yellow]yes, if[/yellow]", "no": "[red]no[/red]"}


@app.command("check")
def check_cmd(
    adapter: Annotated[str, typer.Argument(help="The adapter folder to check.")],
    as_json: Json = False,
) -> None:
    """Report which consumers load the adapter as it is (yes), after a step (yes, if) or not (no), with reasons.
    Exit 0 when every consumer can load it, 3 when some cannot."""
    from peftkit.export.portability import check_portability

    report = check_portability(adapter)
    if as_json:
        print_json({**asdict(report), "all_load": report.all_load})
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table("consumer", "loads", "why / how", title=f"{report.adapter} ({report.peft_type})")
        for verdict in report.verdicts:
            table.add_row(verdict.consumer, SHOWN[verdict.status], "\n".join(verdict.reasons) or "-")
        console = Console()
        console.print(table)
        cannot = [v.consumer for v in report.verdicts if v.status == "no"]
        console.print(f"cannot load it: {', '.join(cannot)}" if cannot else "every consumer can load it")
        if report.convert_command:
            console.print("to serve it where only LoRA loads, convert it (SVD of its weight delta; the energy each "
                          f"module keeps is printed; --energy E picks the rank per module):\n  {report.convert_command}",
                          soft_wrap=True, markup=False)
    if not report.all_load:
        raise typer.Exit(SOME_CANNOT)
