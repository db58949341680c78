"""The typer application object shared by the command modules.

Each command lives in its own module (`peftkit/cli/<command>.py`) and registers itself with
`@app.command()`; `peftkit/cli/__init__.py` imports them all. Commands only parse, call the library and print.

Command modules import the library (torch, transformers, ...) inside the command function, never at module level:
`peftkit --help`, `peftkit --version`, `peftkit <command> --help` and shell completion import none of it.
"""

from __future__ import annotations

from typing import Annotated

import typer

from peftkit._version import __version__

app = typer.Typer(
    name="peftkit",
    help="Parameter-efficient fine-tuning for Hugging Face causal LMs.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every command
    pretty_exceptions_enable=False,
)

state = {"debug": False}


def _print_version(value: bool) -> None:
    if value:
        print(f"peftkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """peftkit: inject, train, merge, compress and size adapters for HF causal LMs."""
    state["debug"] = debug
