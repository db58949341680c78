"""Ship it: merge, export, check, convert (a non-LoRA adapter to a LoRA) or compress (a full fine-tune to a LoRA) a
finished run, each as the CLI command that does it, and uploads of data files.

A job is that command run as a process (the CLI's code path, its checks and its one-line errors), its output kept in
ROOT/.peftkit-ui/jobs/ID.log and streamed to the page with the command line, so the user can run the same thing
from a shell. Outputs go beside the run folder: ROOT/NAME-merged/, ROOT/NAME.gguf (the CLI writes them atomically).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.ui.runs import STATE, child_env
from peftkit.ui.security import open_regular

SERVED_RANK = 16  # convert / compress: vLLM's default max_lora_rank
UPLOAD_LIMIT = 2 << 30  # bytes of one uploaded data file
UPLOAD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.(jsonl|json|csv|parquet|txt)")


def _merge(status: dict[str, Any], root: Path) -> list[str]:
    return ["peftkit", "merge", "--adapter", status["adapter"], "--output", str(root / f"{status['name']}-merged"),
            *_base(status)]


def _export(status: dict[str, Any], root: Path) -> list[str]:
    source = status["adapter"] or status["model"]
    return ["peftkit", "export", source, "--output", str(root / f"{status['name']}.gguf")]


def _check(status: dict[str, Any], root: Path) -> list[str]:
    return ["peftkit", "check", status["adapter"]]


def _convert(status: dict[str, Any], root: Path) -> list[str]:
    return ["peftkit", "convert", status["adapter"], "--to", "lora", "--rank", str(SERVED_RANK), "--output",
            str(root / f"{status['name']}-lora"), *_base(status)]


def _compress(status: dict[str, Any], root: Path) -> list[str]:
    return ["peftkit", "compress", "--finetuned", status["model"], "--rank", str(SERVED_RANK), "--output",
            str(root / f"{status['name']}-lora"), *_base(status)]


def _base(status: dict[str, Any]) -> list[str]:
    """`--base` when the run trained another model than the embedded one."""
    return ["--base", status["base"]] if status.get("base") else []


# action -> (what it needs: "adapter", "model" (a full fine-tune's folder) or "result" (either), its command)
ACTIONS: dict[str, tuple[str, Callable[[dict[str, Any], Path], list[str]]]] = {
    "merge": ("adapter", _merge), "export": ("result", _export), "check": ("adapter", _check),
    "convert": ("adapter", _convert), "compress": ("model", _compress)}


class Jobs:
    """Commands started from the Ship tab, by id."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folder = root / STATE / "jobs"
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, status: dict[str, Any], action: str) -> dict[str, Any]:
        """Start `action` on the run described by `status` (`Runs.status`); {"job", "argv", "command"}."""
        if action not in ACTIONS:
            raise PeftkitError(f"unknown action {action!r}: {' | '.join(ACTIONS)}")
        needs, command = ACTIONS[action]
        has = {"adapter": status["adapter"], "model": status["model"], "result": status["adapter"] or status["model"]}
        if status["status"] != "finished" or not has[needs]:
            what = {"adapter": "an adapter", "model": "a whole model (full / freeze)", "result": "a result"}[needs]
            raise PeftkitError(f"{action} needs a finished run with {what}; run {status['name']!r} is "
                               f"{status['status']}{'' if has[needs] or status['status'] != 'finished' else ' without one'}")
        argv = command(status, self.root)
        job = uuid.uuid4().hex[:12]
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"{job}.log", "wb") as log:
            self.procs[job] = subprocess.Popen([sys.executable, "-m", "peftkit.cli", *argv[1:]], cwd=self.root,
                                               stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                               env={**child_env(), "COLUMNS": "120"})
        (self.folder / f"{job}.json").write_text(json.dumps({"argv": argv, "action": action}))
        from peftkit.ui.plan import shell_text

        return {"job": job, "argv": argv, "command": shell_text(argv)}

    async def events(self, job: str, request: Any, poll_s: float) -> AsyncIterator[str]:
        """The job's output lines as they come ("line" events), then ("end", {"code": exit code})."""
        log = self.folder / f"{job}.log"
        if not re.fullmatch(r"[0-9a-f]{12}", job) or not log.is_file():
            raise PeftkitError(f"no job {job!r}")
        offset = 0
        while not await request.is_disconnected():
            data = b""
            file = open_regular(log)  # a link swapped in for the log is not followed (read as empty)
            if file is not None:
                with file:
                    file.seek(offset)
                    data = file.read()
            end = data.rfind(b"\n") + 1
            for line in data[:end].decode(errors="replace").splitlines():
                yield f"event: line\ndata: {json.dumps(line)}\n\n"
            offset += end
            proc = self.procs.get(job)
            code = proc.poll() if proc is not None else -1
            if code is not None and not end:
                yield f"event: end\ndata: {json.dumps({'code': code})}\n\n"
                return
            await asyncio.sleep(poll_s)

    async def save_upload(self, name: str, chunks: AsyncIterator[bytes]) -> str:
        """Write an uploaded data file to ROOT/uploads/NAME (a temporary file renamed when complete); its path
        relative to the root. A name that is not a plain data-file name, or a file over the limit, is refused."""
        if not UPLOAD_NAME.fullmatch(name):
            raise PeftkitError(f"upload name {name!r} must be a plain file name ending in .jsonl, .json, .csv, "
                               ".parquet or .txt")
        folder = self.root / "uploads"
        with contextlib.suppress(FileExistsError):  # a link in its place is refused just below
            folder.mkdir()
        try:  # the folder opened without following a link; every name below goes through this descriptor, so a
            # link swapped in for the folder after this point is not written through either
            dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            raise PeftkitError(f"{folder} must be a plain folder under the runs root (it is a link or a file); "
                               "move it away so uploads stay under the root") from None
        tmp = f".{name}.{uuid.uuid4().hex[:8]}.part"
        exists = PeftkitError(f"uploads/{name} already exists; rename the file (an upload never replaces one)")
        size = 0
        try:
            with contextlib.suppress(FileNotFoundError):  # refused before the upload is read, when it can be
                os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                raise exists
            with open(tmp, "xb", opener=lambda path, flags: os.open(path, flags, 0o666, dir_fd=dir_fd)) as f:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > UPLOAD_LIMIT:
                        raise PeftkitError(f"upload {name!r} is over {UPLOAD_LIMIT >> 30} GiB; point at a file "
                                           "under the runs root instead")
                    f.write(chunk)
            os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)  # fails if the name
        except FileExistsError:                                                            # exists (even a link)
            raise exists from None
        except OSError as exc:
            raise PeftkitError(f"upload {name!r} could not be written under {folder}: {exc.strerror or exc}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            os.close(dir_fd)
        return f"uploads/{name}"
