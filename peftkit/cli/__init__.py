"""`peftkit` command line: one module per command, all registered on the shared typer app.

Every module in this package whose name does not start with `_` is a command module: importing it registers its
command on `peftkit.cli._app.app` with `@app.command(...)`. Adding a command means adding one file here.
"""

import importlib
import logging
import pkgutil
import sys

import typer

from peftkit.cli._app import app, state
from peftkit.errors import PeftkitError


def _register_commands() -> None:
    """Import every command module of this package so that its `@app.command` runs."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_register_commands()


class _ConsoleHandler(logging.Handler):
    """The library's diagnostics channel shown on the terminal: the `peftkit` loggers' INFO records are progress
    lines on stdout, WARNING and above go to stderr as `warning: ...`. The streams are looked up at each record,
    so redirected or captured streams (pytest's capsys) see them."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            print(f"warning: {message}", file=sys.stderr, flush=True)
        else:
            print(message, file=sys.stdout, flush=True)


def _show_library_logs() -> None:
    """Route the `peftkit` loggers to the terminal once (the library itself never prints)."""
    logger = logging.getLogger("peftkit")
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        logger.addHandler(_ConsoleHandler())
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> None:
    """Console entry point. A `PeftkitError` and a usage error (missing option, bad value, unknown command)
    become one line `error: ...` on stderr and exit code 2; `--debug` shows the traceback instead."""
    args = sys.argv[1:] if argv is None else argv
    _show_library_logs()
    try:
        code = app(args=args, standalone_mode=False, prog_name="peftkit")
    except PeftkitError as exc:
        if state["debug"] or "--debug" in args:
            raise
        _fail(str(exc))
    except _ABORTS:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except _USAGE_ERRORS as exc:
        ctx = getattr(exc, "ctx", None)
        command = ctx.command_path if ctx is not None else "peftkit"
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        _fail(f"{message} (see '{command} --help')")
    if isinstance(code, int) and code:  # typer.Exit(code) returns its code when not standalone
        sys.exit(code)


def _fail(message: str) -> None:
    """The error convention: one line on stderr, exit code 2."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def _error_types() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(abort types, usage-error types). Recent typer vendors click, its errors deriving from
    `typer.exceptions.TyperException`; older typer raises the click package's own. Catch whichever exist, so no
    usage error or Ctrl-C ever reaches the user as a traceback."""
    aborts: tuple[type[BaseException], ...] = (typer.Abort, KeyboardInterrupt)
    usage: tuple[type[BaseException], ...] = ()
    if hasattr(typer.exceptions, "TyperException"):
        usage += (typer.exceptions.TyperException,)
    try:
        import click
    except ImportError:
        return aborts, usage
    return aborts + (click.exceptions.Abort,), usage + (click.ClickException,)


_ABORTS, _USAGE_ERRORS = _error_types()


__all__ = ["app", "main"]
