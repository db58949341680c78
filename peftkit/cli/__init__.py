"""`peftkit` command line: one module per command, all registered on the shared typer app.

Every module in this package whose name does not start with `_` is a command module: importing it registers its
command on `peftkit.cli._app.app` with `@app.command(...)`. Adding a command means adding one file here.
"""

import importlib
import pkgutil
import sys

from peftkit.cli._app import app, state
from peftkit.errors import PeftkitError


def _register_commands() -> None:
    """Import every command module of this package so that its `@app.command` runs."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the app; a `PeftkitError` becomes `error: ...` on stderr and exit code 2."""
    import click

    args = sys.argv[1:] if argv is None else argv
    try:
        code = app(args=args, standalone_mode=False, prog_name="peftkit")
    except PeftkitError as exc:
        if state["debug"] or "--debug" in args:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    if isinstance(code, int) and code:  # typer.Exit(code) returns its code when not standalone
        sys.exit(code)


__all__ = ["app", "main"]
