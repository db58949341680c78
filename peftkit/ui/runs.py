"""The page's runs: each one a `peftkit train` process of its own, found again from its run folder.

A run launched from the page is the CLI command the page showed, started as a separate process in a session of its
own (`start_new_session`): closing the tab, losing the network or restarting the UI server does not stop it. What
the page needs to find it again is kept beside the run folders, never inside them (the run folder is the trainer's):

    ROOT/
      NAME/                       the run folder (`peftkit train --output ROOT/NAME`)
      .peftkit-ui/NAME.json       argv, pid and the process's start time (so a reused pid is not taken for it),
                                  and its exit code once the server that started it saw it end
      .peftkit-ui/NAME.log        the process's output (its `error:` line, when it fails)

Status comes from those and the run folder: running (the process is alive), finished (summary.json was written),
stopped (ended by the page's stop, or interrupted), failed (with the CLI's one-line error). Stop sends SIGTERM,
which the CLI turns into a clean interrupt (the newest checkpoint stays; resume continues from it).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from peftkit.errors import PeftkitError
from peftkit.ui.security import open_regular

STATE = ".peftkit-ui"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class Runs:
    """The run folders under `root`, and the processes the page started for them."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.state = self.root / STATE
        self._lock = threading.Lock()

    def folder(self, name: str) -> Path:
        """ROOT/NAME for a plain name (letters, digits, `.`, `_`, `-`; no path), else a one-line error."""
        if not isinstance(name, str) or not NAME.fullmatch(name) or name in (".", ".."):
            raise PeftkitError(f"run name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a "
                               "letter or digit (a folder directly under the runs root)")
        return self.root / name

    def launch(self, name: str, argv: list[str]) -> dict[str, Any]:
        """Start `argv` (a `peftkit train ...` command line) writing to ROOT/NAME; refused if that name is taken."""
        folder, record = self.folder(name), self._record(name)
        if folder.exists() or folder.is_symlink() or record is not None and self._alive(record):
            raise PeftkitError(f"a run named {name!r} already exists under {self.root}; pick another name")
        return self._start(name, argv)

    def resume(self, name: str) -> dict[str, Any]:
        """Continue a stopped run: its own command again with --resume (the trainer checks the options match)."""
        record = self._record(name)
        if record is None:
            raise PeftkitError(f"run {name!r} was not started from this page; resume it with `peftkit train ... "
                               f"--output {self.folder(name)} --resume`")
        if self._alive(record):
            raise PeftkitError(f"run {name!r} is still running")
        argv = [a for a in record["argv"] if a != "--resume"] + ["--resume"] if isinstance(record["argv"], list) else []
        if not _writes_only_to(argv, self.folder(name)):
            raise PeftkitError(f"the record of run {name!r} in {self.state} does not write to {self.folder(name)}; "
                               "it was not written by this page: resume the run from a shell")
        return self._start(name, argv)

    def stop(self, name: str) -> dict[str, Any]:
        """SIGTERM to the run's process group (the trainer stops cleanly and keeps its newest checkpoint)."""
        record = self._record(name)
        if record is None or not self._alive(record):
            raise PeftkitError(f"run {name!r} is not running")
        record["stopped"] = True
        self._write(name, record)
        os.killpg(record["pid"], signal.SIGTERM)
        return self.status(name)

    def names(self) -> list[str]:
        """Every run under the root: folders holding a run_config.yaml, and the runs this page started."""
        found = {p.name for p in self.root.iterdir() if p.is_dir() and not p.is_symlink()
                 and (p / "run_config.yaml").is_file() and NAME.fullmatch(p.name)} if self.root.is_dir() else set()
        if self.state.is_dir():
            found |= {p.stem for p in self.state.glob("*.json") if NAME.fullmatch(p.stem)}
        return sorted(found)

    def status(self, name: str) -> dict[str, Any]:
        """What the Runs tab shows for one run: status, its error line, progress, ETA, the command; a name with
        neither a folder nor a record is an error (not a run that "stopped")."""
        folder, record = self.folder(name), self._record(name)
        if record is None and not folder.is_dir():
            raise PeftkitError(f"run {name!r} not found under {self.root}")
        config = _read_yaml(folder / "run_config.yaml")
        train = [r for r in read_metrics(folder / "metrics.jsonl")[0] if r.get("kind") == "train"]
        last = train[-1] if train else {}
        total = config.get("max_steps") if isinstance(config.get("max_steps"), int) else None
        state, error = self._state(name, folder, record)
        eta = None
        if state == "running" and total and last.get("step") and last.get("elapsed_s"):
            eta = last["elapsed_s"] / last["step"] * (total - last["step"])
        return {"name": name, "status": state, "error": error, "step": last.get("step", 0), "total_steps": total,
                "eta_s": eta, "loss": last.get("loss"), "method": config.get("method"),
                "objective": config.get("objective"), "command": (record or {}).get("argv"),
                "adapter": str(folder / "adapter") if (folder / "adapter").is_dir() else None,
                "model": str(folder / "model") if (folder / "model").is_dir() else None, "folder": str(folder),
                "base": config.get("model"), "config": config}

    def _state(self, name: str, folder: Path, record: dict | None) -> tuple[str, str | None]:
        if record is not None and self._alive(record):
            return "running", None
        if (folder / "summary.json").is_file():
            return "finished", None
        lines = _tail_lines(self.state / f"{name}.log")
        error = next((line for line in reversed(lines) if line.startswith("error: ")), None)
        if record is not None and record.get("stopped") or any("interrupted" in line for line in lines[-5:]):
            return "stopped", None
        if error or record is not None and record.get("exit_code") not in (None, 0):
            return "failed", error or f"exited with code {record.get('exit_code') if record else '?'}"
        return ("stopped", None) if record is None else ("failed", "the process ended without a result")

    def _start(self, name: str, argv: list[str]) -> dict[str, Any]:
        if argv[:2] != ["peftkit", "train"]:
            raise PeftkitError("a run is a `peftkit train ...` command")
        self.state.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.state / f"{name}.log", "ab") as log:
            env = child_env()
            proc = subprocess.Popen([sys.executable, "-m", "peftkit.cli", *argv[1:]], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                    cwd=self.root)
            record = {"argv": argv, "pid": proc.pid, "started": time.time(), "proc_start": _proc_start(proc.pid),
                      "exit_code": None, "stopped": False}
            self._write(name, record)
        threading.Thread(target=self._reap, args=(name, proc), daemon=True).start()
        return self.status(name)

    def _reap(self, name: str, proc: subprocess.Popen) -> None:
        """Record the exit code of a process this server started (another server finds the status without it)."""
        code = proc.wait()
        with self._lock:
            record = self._record(name) or {}
            if record.get("pid") == proc.pid:
                self._write(name, {**record, "exit_code": code})

    def _record(self, name: str) -> dict[str, Any] | None:
        file = open_regular(self.state / f"{self.folder(name).name}.json")
        if file is None:
            return None
        try:
            with file:
                record = json.loads(file.read())
        except (OSError, ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            return None
        return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None

    def _write(self, name: str, record: dict[str, Any]) -> None:
        path = self.state / f"{name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)

    @staticmethod
    def _alive(record: dict[str, Any]) -> bool:
        """The recorded process still runs (the same process: its start time matches, so a reused pid is not it)."""
        if record.get("exit_code") is not None:
            return False
        start = _proc_start(record["pid"])
        return start is not None and start == record.get("proc_start") and not _zombie(record["pid"])


def _writes_only_to(argv: list[str], folder: Path) -> bool:
    """`argv` (a recorded command line) gives one output, `--output FOLDER`: a record under the state folder is a
    file anyone who can write to the root may have edited, and it must not send a run elsewhere."""
    outputs = [i for i, a in enumerate(argv) if not isinstance(a, str) or a == "--output" or a.startswith(("--output=", "-o"))]
    return len(outputs) == 1 and argv[outputs[0]] == "--output" and argv[outputs[0] + 1] == str(folder)


def child_env() -> dict[str, str]:
    """The environment of a command the page starts: this one, unbuffered, with this peftkit first on the path (the
    command runs in the runs root, where a source checkout's package would not be found otherwise)."""
    here = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def read_metrics(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """(records, offset after them) of metrics.jsonl from byte `offset`: whole lines only (a line being written is
    read next time), a damaged line skipped. Only a regular file reached through no link is read (`open_regular`):
    a FIFO or a link to /dev/zero in a run folder would block or fill the server, which reads metrics on its event
    loop."""
    file = open_regular(path)
    if file is None:
        return [], offset
    try:
        with file:
            file.seek(offset)
            data = file.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict):
            record.pop("samples", None)  # generated examples: large, not plotted
            records.append(record)
    return records, offset + end


def _read_yaml(path: Path) -> dict[str, Any]:
    file = open_regular(path)  # as read_metrics: never a FIFO, a device or a link
    if file is None:
        return {}
    try:
        with file:
            loaded = yaml.safe_load(file.read().decode(errors="replace"))
    except (OSError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _tail_lines(path: Path, size: int = 1 << 16) -> list[str]:
    """The lines of the last `size` bytes of a log (a run's error line is at its end), [] when `open_regular`
    refuses it: a log is the process's whole output, and a link to /dev/zero must not fill the server."""
    file = open_regular(path)
    if file is None:
        return []
    try:
        with file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - size))
            return file.read().decode(errors="replace").splitlines()
    except OSError:
        return []


def _proc_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()  # fields after the command name (which may hold spaces)


def _proc_start(pid: int) -> str | None:
    fields = _proc_fields(pid)
    return fields[19] if fields else None  # starttime: field 22 of /proc/PID/stat


def _zombie(pid: int) -> bool:
    fields = _proc_fields(pid)
    return fields is not None and fields[0] == "Z"
