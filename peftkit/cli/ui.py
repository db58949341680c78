"""`peftkit ui`: the local web page (set up, size, watch, try and ship a fine-tune); see peftkit/ui/.

    peftkit ui                          # http://127.0.0.1:7860, runs under ./peftkit-runs
    peftkit ui --root ~/runs --port 8000
    peftkit ui --host 0.0.0.0           # other machines: needs the token the command prints

Installed with `pip install 'peftkit[ui]'` (Starlette and uvicorn). Runs started from the page are processes of
their own: stopping this server (Ctrl-C) leaves them running, and the page finds them again when it restarts.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated

import typer

from peftkit.cli._app import app
from peftkit.errors import PeftkitError


@app.command("ui")
def ui_cmd(
    root: Annotated[str, typer.Option("--root", help="Folder holding the runs (and uploads); the page reads and writes only under it.")] = "peftkit-runs",
    host: Annotated[str, typer.Option("--host", help="Address to bind; anything but localhost needs the printed token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to serve on.")] = 7860,
    token: Annotated[str | None, typer.Option("--token", help="The access token (default: a new random one).")] = None,
) -> None:
    """Serve the local web page: new run (form, preview, estimate, command), runs, chat, merge and export."""
    try:
        import uvicorn

        from peftkit.ui.security import is_loopback
        from peftkit.ui.server import make_app
    except ImportError as exc:
        raise PeftkitError(f"the web page needs its extra: pip install 'peftkit[ui]' ({exc.name} is missing)") from None
    if not 0 < port < 65536:
        raise PeftkitError(f"--port must be 1-65535, got {port}")
    local = is_loopback(host)
    token = token or secrets.token_urlsafe(24)
    application = make_app(Path(root).expanduser(), token=token, local=local)
    shown = f"[{host}]" if ":" in host else host
    print(f"peftkit ui: http://{shown}:{port}/{'' if local else f'?token={token}'}  (runs under {Path(root).resolve()})")
    uvicorn.run(application, host=host, port=port, log_level="warning")
