"""What keeps the page's server to its user: who may call it, and which files it may touch.

- Bound to a loopback address (the default), requests must name a loopback host (so a web site that rebinds its
  DNS name to 127.0.0.1 is refused). Bound elsewhere, every request must carry the server's token (`?token=` once;
  a cookie after).
- Every state-changing request (POST) carries the token the page was served with in a header, which a form or
  script of another site cannot send without a CORS preflight this server never grants; an Origin, when sent,
  must be this server's own.
- Paths given on the page are relative to the runs root (or absolute inside it) and must stay inside it after
  resolving `..` and symbolic links; anything else is refused in one line. Hub ids (`org/name`, not a file under
  the root) are passed on as they are: they read nothing local.
- Files the server reads from run folders (metrics, configs, logs, summaries, its own records) are opened by
  `open_regular`, which checks the opened file, not its name: a link swapped in after a check is never followed.
"""

from __future__ import annotations

import hmac
import os
import re
import stat
from pathlib import Path
from typing import Any, BinaryIO

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from peftkit.errors import PeftkitError

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
HOST_HEADER = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?")  # a host, an optional port: no more
TOKEN_HEADER = "x-peftkit-token"
TOKEN_COOKIE = "peftkit_token"
READ_ONLY = frozenset({"GET", "HEAD"})  # HTTP methods that change nothing here; every other one is guarded


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS


def request_host(request: Request) -> str:
    """The host the request's Host header names, lower-cased ("" when it is missing or is anything but a host and an
    optional port: a URL parser would read `evil.com:80@127.0.0.1` as 127.0.0.1, and `[::1` not at all)."""
    match = HOST_HEADER.fullmatch(request.headers.get("host", ""))
    return match.group(1).lower() if match else ""


def check_request(request: Request, token: str, local: bool) -> Response | None:
    """None when `request` may go on, else the response refusing it."""
    host = request_host(request)
    if local and not is_loopback(host):
        return JSONResponse({"error": f"host {host!r} refused: this server answers only on localhost"}, 403)
    given = request.headers.get(TOKEN_HEADER) or request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE)
    if not local and not _same(given, token):
        return JSONResponse({"error": "this server needs its token: open the address it printed (?token=...)"}, 401)
    if request.method not in READ_ONLY:
        origin = request.headers.get("origin")
        if origin is not None and origin.split("://", 1)[-1] != request.headers.get("host"):
            return JSONResponse({"error": f"cross-site request from {origin!r} refused"}, 403)
        if not _same(request.headers.get(TOKEN_HEADER), token):
            return JSONResponse({"error": "a state-changing request needs the page's token header"}, 403)
    return None


def _same(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def inside(root: Path, value: str, what: str) -> Path:
    """`value` (relative to `root`, or absolute) as a path inside `root`, links resolved; else a one-line error."""
    if value.startswith("~"):
        raise PeftkitError(f"{what} {value!r}: give a path relative to the runs root {root}, not one under ~")
    path = (root / value).resolve() if not Path(value).is_absolute() else Path(value).resolve()
    if path != root and root not in path.parents:
        raise PeftkitError(f"{what} {value!r} is outside the runs root {root}; put it under the root (or upload it)")
    return path


LOCAL_FIELDS = ("model", "data", "eval_data", "chat_template")


def confine_form(root: Path, form: dict[str, Any]) -> dict[str, Any]:
    """The form with every local path made absolute and checked to stay under `root` (see the module docstring),
    so the command the page shows means the same from any folder; hub ids and built-in names (a chat template's
    `chatml`) pass as they are."""
    out = dict(form)
    for field in LOCAL_FIELDS:
        value = out.get(field)
        if isinstance(value, str) and value.strip():
            out[field] = ",".join(_confined(root, part.strip(), field) for part in value.split(","))
    return out


def _confined(root: Path, part: str, field: str) -> str:
    spec, sep, weight = part.rpartition(":") if field == "data" and _is_weight(part.rpartition(":")[2]) else (part, "", "")
    local = Path(spec).is_absolute() or ".." in Path(spec).parts or spec.startswith("~") or (root / spec).exists()
    if not local:
        return part  # a hub id or a built-in name: nothing local is read
    return str(inside(root, spec, field.replace("_", " "))) + sep + weight


def _is_weight(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def open_regular(path: Path) -> BinaryIO | None:
    """`path` opened for reading if it is a regular file reached through no symbolic link, else None. What is
    checked is the opened file, so a link or FIFO swapped in between a caller's check and this open is refused too:
    O_NOFOLLOW refuses a link as the last part, O_NONBLOCK keeps a FIFO from blocking the open, fstat says what was
    opened, and the kernel's name of it (/proc/self/fd, where there is one) must be `path` itself, so no folder on
    the way was a link either. `path` must be absolute with its links resolved (the runs root is)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        opened = os.readlink(f"/proc/self/fd/{fd}") if os.path.isdir("/proc/self/fd") else str(path)
    except OSError:
        regular, opened = False, ""
    if not regular or opened != str(path):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")
