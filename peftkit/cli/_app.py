"""The typer application object shared by the command modules.

Each command lives in its own module (`peftkit/cli/<command>.py`) and registers itself with
`@app.command()`; `peftkit/cli/__init__.py` imports them all. Commands only parse, call the library and print.
"""

import typer

app = typer.Typer(
    name="peftkit",
    help="Parameter-efficient fine-tuning for Hugging Face causal LMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    """peftkit: inject, train, merge, compress and size adapters for HF causal LMs."""
    state["debug"] = debug
