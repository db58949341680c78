"""`peftkit` command line: one module per command, all registered on the shared typer app.

Every module in this package whose name does not start with `_` is a command module: importing it registers its
command on `peftkit.cli._app.app` with `@app.command(...)`. Adding a command means adding one file here. A command
module imports the library (torch, transformers, datasets, accelerate) only inside its command function, so
`--help`, `--version` and shell completion stay instant (tests/cli/test_cli_manners.py checks it).
"""

import atexit
import contextlib
import errno
import importlib
import logging
import os
import pkgutil
import signal
import sys
import threading

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
    become one line `error: ...` on stderr and exit code 2; `--debug` shows the traceback instead. Run as the
    program (no `argv`), the exit code is final once decided (`_settle`)."""
    if argv is not None:
        _run(argv)
        return
    try:
        _run(sys.argv[1:])
    except SystemExit as exc:
        _settle(exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1)
        raise
    _settle(0)


def _settle(code: int) -> None:
    """The outcome is decided (and its `error:` line printed): a Ctrl-C or SIGTERM during the interpreter's
    shutdown (torch's finalizers take a moment) must not turn it into a KeyboardInterrupt traceback and the signal's
    code (-2). While Python code still runs (thread joins, exit handlers) such a signal ends the process at once with
    `code`; from the exit handlers on, the signals are ignored, because Python resets any other handler to the
    default (death by the signal) before it tears the modules down."""
    def handler(signum: int, frame: object) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)

    def ignore() -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, handler)
        atexit.register(ignore)  # registered last, so it runs first


def _run(args: list[str]) -> None:
    """Run the command line `args`, every failure turned into `_fail`'s one line and exit code."""
    debug = "--debug" in args
    _show_library_logs()
    _quiet_third_party_progress()
    _terminate_on_sigterm()
    try:
        code = app(args=args, standalone_mode=False, prog_name="peftkit")
    except PeftkitError as exc:
        if state["debug"] or debug:
            raise
        _fail(str(exc))
    except Terminated:
        _fail("terminated (SIGTERM); unfinished outputs were removed, finished ones kept", code=143)
    except _ABORTS:
        _fail(INTERRUPTED, code=130)
    except OSError as exc:
        if state["debug"] or debug:
            raise
        _fail(os_error_message(exc))
    except _USAGE_ERRORS as exc:
        ctx = getattr(exc, "ctx", None)
        command = ctx.command_path if ctx is not None else "peftkit"
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        _fail(f"{message} (see '{command} --help')")
    if code == 130:  # typer turns Ctrl-C into Exit(130), returned as the code when not standalone
        _fail(INTERRUPTED, code=130)
    if isinstance(code, int) and code:  # typer.Exit(code) returns its code when not standalone
        sys.exit(code)


def _fail(message: str, code: int = 2) -> None:
    """The error convention: one line on stderr; exit code 2 for an error, bad input or a fault of the machine
    (disk, permissions) alike, as the README promises; 130 / 143 for Ctrl-C / SIGTERM."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(code)


INTERRUPTED = "interrupted (Ctrl-C); unfinished outputs were removed, finished ones kept"


class Terminated(BaseException):
    """SIGTERM as an exception, so that `finally` blocks and atomic writes clean up as they do on Ctrl-C."""


def _terminate_on_sigterm() -> None:
    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def os_error_message(exc: OSError) -> str:
    """One line for a fault of the machine: the cause (no space left, read-only, permission denied) and the path."""
    where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
    hint: dict[int | None, str] = {  # looked up by exc.errno, which may be None
        errno.ENOSPC: "; free some space or write to another disk", errno.EROFS: "; write to a writable folder",
        errno.EACCES: "; write to a folder you may write to", errno.EPERM: "; write to a folder you may write to"}
    cause = exc.strerror or str(exc) or type(exc).__name__
    return f"{cause}{where}{hint.get(exc.errno, '')} (unfinished outputs were removed)"


def _quiet_third_party_progress() -> None:
    """No download / loading / tokenizing bars from the Hugging Face libraries: an error line must not follow a
    screen of them, and peftkit says itself what it is doing. Commands import transformers and datasets when they
    run, after this: the environment switches, read at their import, are what usually turns the bars off."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by huggingface_hub, hence transformers
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is first imported
    if "transformers" in sys.modules:  # already imported: its switch, not the environment, decides now
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


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
