"""The page's HTTP server: a Starlette app over `plan`, `runs`, `tryit` and `ship`, serving the static page.

Why Starlette (with uvicorn): a small, well-kept ASGI toolkit whose streaming responses carry server-sent events
(live metrics, streamed answers, a command's output) with no extra protocol, and whose only job here is routing;
the page itself is static files shipped in the package (no CDN, works offline), with uPlot for the charts.

Every error the CLI would print comes back as {"error": the same line, "field": the option it names, if any}
with status 400, and the page shows it next to that field.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from peftkit.errors import PeftkitError
from peftkit.io.fs import read_json_object
from peftkit.ui import plan as planning
from peftkit.ui.runs import Runs, read_metrics
from peftkit.ui.security import TOKEN_COOKIE, check_request, confine_form, inside, open_regular
from peftkit.ui.ship import Jobs
from peftkit.ui.tryit import Chats

STATIC = Path(__file__).parent / "static"


def make_app(root: Path, token: str | None = None, local: bool = True, poll_s: float = 0.5) -> Starlette:
    """The app serving runs under `root`; `token` (generated when None) guards POSTs, and every request when the
    server is not bound to loopback (`local=False`)."""
    root = root.resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise PeftkitError(f"--root {root} is a file, or lies under one; give a folder for the runs (it is created "
                           "when missing)") from None
    token = token or secrets.token_urlsafe(24)
    runs, chats, jobs = Runs(root), Chats(), Jobs(root)

    async def index(request: Request) -> Response:
        page = (STATIC / "index.html").read_text().replace("{{TOKEN}}", token).replace("{{ROOT}}", str(root))
        response = HTMLResponse(page)
        if request.query_params.get("token") == token:
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    async def fields(request: Request) -> Response:
        from peftkit.core.registry import method_names
        from peftkit.train.objectives.base import objective_names

        return JSONResponse({"fields": planning.form_fields(), "methods": method_names(),
                             "objectives": objective_names(), "root": str(root)})

    async def plan(request: Request) -> Response:
        form = confine_form(root, await _json(request, "form"))
        return JSONResponse(await run_in_threadpool(planning.plan, form))

    async def columns(request: Request) -> Response:
        from peftkit.ui.preview import data_columns

        data = str(confine_form(root, {"data": (await _json(request)).get("data") or ""})["data"])
        if not data.strip():
            raise PeftkitError("data: give a data file to map its columns")
        return JSONResponse(await run_in_threadpool(data_columns, data))

    async def launch(request: Request) -> Response:
        body = await _json(request)
        name = str(body.get("name") or "")
        folder = runs.folder(name)
        if not isinstance(body.get("form") or {}, dict):
            raise PeftkitError("the request body's 'form' must be a JSON object of option: value")
        form = confine_form(root, {**(body.get("form") or {}), "output": str(folder)})
        argv = planning.command_line(planning.flag_values(form))
        await run_in_threadpool(planning.plan, form, 0)  # every refusal the CLI makes before training, here
        return JSONResponse(runs.launch(name, argv))

    async def run_list(request: Request) -> Response:
        return JSONResponse([runs.status(name) for name in runs.names()])

    async def run_action(request: Request) -> Response:
        name, action = request.path_params["name"], request.path_params["action"]
        if action not in ("stop", "resume"):
            return JSONResponse({"error": f"unknown action {action!r}: stop | resume"}, 404)
        return JSONResponse(runs.stop(name) if action == "stop" else runs.resume(name))

    async def run_events(request: Request) -> Response:
        name = request.path_params["name"]
        folder = runs.folder(name)
        runs.status(name)  # an unknown run is refused here, before the stream starts

        async def events() -> AsyncIterator[str]:
            offset, last = 0, None
            while not await request.is_disconnected():
                records, offset = read_metrics(folder / "metrics.jsonl", offset)
                if records:
                    yield _event("metrics", records)
                status = runs.status(name)
                if status != last:
                    yield _event("status", status)
                    last = status
                if status["status"] != "running" and not records:
                    return
                await asyncio.sleep(poll_s)

        return _stream(events())

    async def evaluation(request: Request) -> Response:
        summary = runs.folder(request.path_params["name"]) / "summary.json"
        if not summary.is_file():
            raise PeftkitError(f"run {request.path_params['name']!r} has no evaluation yet (it writes summary.json "
                               "when it finishes)")
        inside(root, str(summary), "summary.json")  # a link out of the root is not served
        file = open_regular(summary)  # nor one swapped in after that check
        if file is None:
            raise PeftkitError(f"{summary} is not a regular file in the run folder; it is not served")
        with file:
            return JSONResponse(read_json_object(summary, "the run's evaluation summary", file.read()))

    async def chat(request: Request) -> Response:
        body = await _json(request)
        adapter = _adapter(runs, str(body.get("run") or ""))
        prompt, side = str(body.get("prompt") or ""), str(body.get("side") or "adapter")
        if not prompt.strip() or side not in ("adapter", "base"):
            raise PeftkitError("a chat needs a prompt, and side adapter | base")
        pieces = iterate_in_threadpool(_guarded(chats.stream(adapter, prompt, side)))
        return _stream(_events_of(pieces))

    async def ship(request: Request) -> Response:
        body = await _json(request)
        status = runs.status(str(body.get("run") or ""))
        return JSONResponse(jobs.start(status, str(body.get("action") or "")))

    async def job_events(request: Request) -> Response:
        job = request.path_params["job"]
        return _stream(jobs.events(job, request, poll_s))

    async def upload(request: Request) -> Response:
        name = request.query_params.get("name") or ""
        return JSONResponse({"path": await jobs.save_upload(name, request.stream())})

    routes = [Route("/", index), Route("/api/fields", fields), Route("/api/plan", plan, methods=["POST"]),
              Route("/api/columns", columns, methods=["POST"]),
              Route("/api/runs", run_list), Route("/api/runs", launch, methods=["POST"]),
              Route("/api/runs/{name}/events", run_events),
              Route("/api/runs/{name}/evaluation", evaluation),
              Route("/api/runs/{name}/{action}", run_action, methods=["POST"]),
              Route("/api/chat", chat, methods=["POST"]), Route("/api/ship", ship, methods=["POST"]),
              Route("/api/jobs/{job}/events", job_events), Route("/api/upload", upload, methods=["POST"]),
              Mount("/static", StaticFiles(directory=STATIC), name="static")]
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        refused = check_request(request, token, local)
        return refused if refused is not None else await call_next(request)

    async def refused(request: Request, exc: Exception) -> Response:
        return error_response(exc)

    app = Starlette(routes=routes, middleware=[Middleware(BaseHTTPMiddleware, dispatch=guard)],
                    exception_handlers={PeftkitError: refused})
    app.state.token = token
    return app


def error_response(exc: Exception) -> JSONResponse:
    """The CLI's line, and the option it names (so the page puts it next to that field)."""
    return JSONResponse({"error": str(exc), "field": named_field(str(exc))}, 400)


def named_field(message: str) -> str | None:
    """The option a one-line error is about: `--label-smoothing ...` or `rank must be ...` name it; None if none."""
    names = [f["name"] for f in planning.form_fields()]
    flag = re.search(r"--([a-z][a-z0-9-]*)", message)
    if flag and flag.group(1).replace("-", "_") in names:
        return flag.group(1).replace("-", "_")
    first = re.match(r"\W*([a-z_]+)", message)
    if first and first.group(1) in names:
        return first.group(1)
    if re.search(r"\b(data|rows?|jsonl|column)\b", message):
        return "data"
    return None


async def _json(request: Request, key: str | None = None) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise PeftkitError("the request body must be JSON (an object, not nested thousands deep)") from None
    value = body.get(key) if key and isinstance(body, dict) else body
    if not isinstance(value, dict):
        raise PeftkitError(f"the request body must be a JSON object{f' with {key!r}' if key else ''}")
    return value


def _adapter(runs: Runs, name: str) -> str:
    status = runs.status(name)
    if not status["adapter"]:
        raise PeftkitError(f"run {name!r} has no adapter yet (it is saved when the run finishes)")
    return str(status["adapter"])


def _event(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, default=str)}\n\n"


def _stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-store"})


def _guarded(pieces: Iterator[str]) -> Iterator[tuple[str, str]]:
    """("piece", text) for each generated piece, then ("done", "") or ("error", the one line)."""
    try:
        for piece in pieces:
            yield "piece", piece
    except PeftkitError as exc:
        yield "error", str(exc)
        return
    except Exception as exc:  # noqa: BLE001 - a generation failure: one line on the page, not a broken stream
        yield "error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return
    yield "done", ""


async def _events_of(pieces: AsyncIterator[tuple[str, str]]) -> AsyncIterator[str]:
    async for kind, text in pieces:
        yield _event(kind, text)
