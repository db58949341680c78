"""Taking a run folder for one training process: an OS-level lock, then the checks of what the run will touch.

A run folder is owned by one process at a time. `claim` takes an exclusive `fcntl.flock` on the lock file
`.NAME.peftkit-lock` beside the run folder NAME (beside, not inside: `--overwrite` sets the previous run's folder
aside and creates a new one, and a lock inside would move with it; and a fresh run's folder does not exist until
every input was validated). A second process that wants the same folder is refused in one line naming the process
that holds it. The lock is the kernel's, so a killed run releases it; the file holds the holder's pid, for the
message only, and is removed when the holder releases it (taking it checks that the file locked is still the one at
the path, so a release racing a new claim cannot give two holders).

With `--resume`, everything the run will read or append to is checked before any work starts: no entry of the run
folder's layout, nor anything under tracking/, the result folder or the checkpoint resumed from, is a symbolic link
(peftkit writes only inside the run folder and never through links), and metrics.jsonl is one JSON record per line
(a damaged line is a one-line error naming the file and the line).
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.train.checkpoints.rundir import RunDir
from peftkit.train.config import TrainConfig
from peftkit.train.reporting.metrics import read_records


def lock_file(run_dir: RunDir) -> Path:
    """The lock file of a run folder: `.NAME.peftkit-lock` in the folder that holds it."""
    return run_dir.path.parent / f".{run_dir.name}.peftkit-lock"


def claim(cfg: TrainConfig, main: bool = True) -> tuple[RunDir, Path | None, ExitStack]:
    """(run folder, resume_from, the held lock): `RunDir.locate`'s answer, taken under the run folder's lock (main
    process only) and, on resume, with every file the run will touch checked. Close the ExitStack to release the
    lock; a refusal releases it before raising."""
    run_dir = RunDir.chosen(cfg)
    run_dir.check_place(cfg)  # before the lock file is written beside it
    with ExitStack() as held:
        if main:
            held.enter_context(locked(run_dir))
        run_dir, resume_from = RunDir.locate(cfg)
        if resume_from is not None:
            check_resumable(run_dir, resume_from)
        return run_dir, resume_from, held.pop_all()
    raise AssertionError("unreachable")  # pragma: no cover - the with block returns or raises


@contextmanager
def locked(run_dir: RunDir) -> Iterator[None]:
    """Hold the run folder's lock for the block; held elsewhere: a one-line PeftkitError naming the holder's pid."""
    path = lock_file(run_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PeftkitError(f"cannot create {path.parent} for run folder {run_dir} ({exc.strerror or exc})") from None
    fd = _take(path, run_dir)
    try:
        yield
    finally:
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                os.unlink(path)  # still ours: unlink while holding it (a waiting claim re-checks the path)
        except OSError:
            pass
        os.close(fd)


def _take(path: Path, run_dir: RunDir) -> int:
    """Open and lock `path` (retrying while the file locked is not the one now at `path`); write our pid."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            raise PeftkitError(f"cannot create the lock file {path} of run folder {run_dir} "
                               f"({exc.strerror or exc}); a run folder needs a writable parent folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise PeftkitError(f"cannot lock {path} ({exc.strerror or exc})") from None
            raise PeftkitError(f"run folder {run_dir} is in use by process {holder} (lock {path}); wait for it to "
                               "finish or choose another --output") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # the holder released and removed it between our open and lock: take the new one


def check_resumable(run_dir: RunDir, checkpoint: Path) -> None:
    """Before a resumed run starts: no symbolic link among what it reads or writes, and metrics.jsonl readable."""
    entries = [run_dir.config, run_dir.metrics, run_dir.curve, run_dir.summary, run_dir.adapter, run_dir.model,
               run_dir.tracking, run_dir.checkpoints_folder, run_dir.marker, checkpoint]
    for entry in entries:
        _refuse_link(entry, run_dir)
    for folder in (run_dir.tracking, run_dir.adapter, run_dir.model, checkpoint):
        if folder.is_dir():
            for inner in folder.rglob("*"):
                _refuse_link(inner, run_dir)
    for entry in (run_dir.metrics, run_dir.config, run_dir.curve, run_dir.summary):
        if entry.exists() and not entry.is_file():
            raise PeftkitError(f"--resume: {entry} is not a file; the run folder {run_dir} is damaged (move it "
                               "away and start a new run, or resume another --output)")
    read_records(run_dir.metrics)


def _refuse_link(path: Path, run_dir: RunDir) -> None:
    if path.is_symlink():
        raise PeftkitError(f"--resume: {path} is a symbolic link (to {os.readlink(path)}); peftkit writes only inside "
                           f"the run folder {run_dir}, never through links: replace it with the file itself or "
                           "remove it")
