"""Filesystem safety for everything peftkit writes: outputs appear complete or not at all.

`atomic_dir` writes a folder beside its final place and renames it into place only when complete, removing the
previous content only after that; temporaries of killed runs are cleaned by the next write to the same place; a
marker file records that peftkit wrote a folder. Every command that writes a folder (adapters, merged models,
compressed adapters, checkpoints, the embedded model's conversion) goes through `atomic_dir`; which targets a
command may write at all is decided by `peftkit.io.outputs.check_output`.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peftkit._version import __version__
from peftkit.errors import PeftkitError

log = logging.getLogger(__name__)
MARKER_NAME = ".peftkit-output.json"  # written into every folder peftkit writes; --overwrite replaces only those


def _umask_permissions(folder: Path) -> None:
    """Give the written files the permissions the user's umask asks for: safetensors creates its files 0600,
    which would hide an adapter or model from a server running as another user (vLLM, TGI)."""
    mask = os.umask(0)
    os.umask(mask)
    for file in folder.rglob("*"):
        if file.is_file():
            file.chmod(0o666 & ~mask)


@contextmanager
def atomic_dir(path: str | os.PathLike, command: str = "peftkit") -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` by renames, on error it is deleted.

    Readers never see a half-written folder: either the old content or the complete new one, and the old one is
    removed only after the new one is in place. `command` (e.g. "merge") is recorded in the marker file
    (`MARKER_NAME`) every such folder gets, which lets a later `--overwrite` recognise the folder as peftkit's. Temporary folders that a
    killed process left beside `path` are removed first (`remove_stale_temporaries`).
    """
    final = Path(path)
    _refuse_foreign(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    # only what was there when checked may be replaced: not a folder that another command created meanwhile
    existed = (final.exists() or final.is_symlink()) and final.resolve() not in _EXPECTED_NEW
    tmp.mkdir()
    try:
        yield tmp
        write_marker(tmp, command)
        _umask_permissions(tmp)
        _swap_in(tmp, final, existed)
        _EXPECTED_NEW.discard(final.resolve())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_EXPECTED_NEW: set[Path] = set()  # outputs `outputs.check_output` found absent in this process


def expect_new(path: Path, new: bool) -> None:
    """Record that output `path` was checked and found absent (`new`), or present and replaceable: `atomic_dir`
    will then refuse to replace a folder that appeared there after the check (two commands writing one output)."""
    (_EXPECTED_NEW.add if new else _EXPECTED_NEW.discard)(path.resolve())


def refuse_protected(resolved: Path, shown: str) -> None:
    """The working directory, the home directory and filesystem roots are never replaced, nor folders holding them."""
    protected = {"the working directory": Path.cwd().resolve(), "your home directory": Path.home().resolve()}
    if resolved == Path(resolved.anchor):
        raise PeftkitError(f"output {shown!r} is a filesystem root; choose a new folder for the output")
    for what, place in protected.items():
        if place == resolved or resolved in place.parents:
            raise PeftkitError(f"output {shown!r} is or contains {what} ({place}); choose a new folder for the output")


def _refuse_foreign(final: Path) -> None:
    """The last line of defence of every write (the commands check earlier, with their inputs): never replace a
    protected place, a file, or a non-empty folder that peftkit did not write."""
    refuse_protected(final.resolve(), str(final))
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise PeftkitError(f"{str(final)!r} exists and is not a folder; peftkit writes its output as a new folder")
    if final.is_dir() and any(final.iterdir()) and not written_by_peftkit(final):
        raise PeftkitError(f"{str(final)!r} holds files peftkit did not write (no {MARKER_NAME}); peftkit replaces "
                           "only its own outputs: write to a new folder")


def _swap_in(tmp: Path, final: Path, existed: bool) -> None:
    """Rename `tmp` to `final`; a `final` that `existed` when the write began is renamed aside first and deleted only
    once `tmp` is in place (if that last rename fails, the old folder is put back). One that appeared meanwhile (two
    commands writing to one output at once) is never replaced: the kernel's rename refuses a non-empty folder."""
    old = None
    if not existed:
        try:
            tmp.rename(final)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            raise PeftkitError(f"output {str(final)!r} was created by another command while this one ran; it was left "
                               "as it is and this result discarded: write to another --output") from None
        return
    if final.exists() or final.is_symlink():
        old = final.parent / f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        if old is not None:
            old.rename(final)
        raise
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    """Delete a file, a symlink or a folder tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Remove the `.NAME.tmp-PID-*` (unfinished new result) and `.NAME.old-PID-*` (replaced result) folders beside
    `final` whose process is no longer running, i.e. that a killed run left behind; returns what was removed, and
    logs it. A `.NAME.prev-PID-*` folder (a previous training run set aside by `--overwrite`) is a result, so it is
    only reported."""
    removed = []
    for item in final.parent.glob(f".{glob.escape(final.name)}.*-*-*"):
        kind, _, rest = item.name[len(final.name) + 2:].partition("-")
        pid = rest.split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if kind in ("tmp", "old"):
            _remove(item)
            removed.append(item)
            log.info("removed %s, left behind by an interrupted peftkit run", item)
        elif kind == "prev":
            log.warning("%s holds an earlier run that an interrupted --overwrite run set aside; rename it back or "
                        "remove it yourself", item)
    return removed


def _alive(pid: int) -> bool:
    """Whether a process with this id exists (ours counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_marker(folder: Path, command: str) -> None:
    """Record that peftkit's `command` wrote `folder` (what `--overwrite` checks before replacing a folder)."""
    info = {"written_by": "peftkit", "command": command, "peftkit_version": __version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (folder / MARKER_NAME).write_text(json.dumps(info, indent=2) + "\n")


def written_by_peftkit(folder: Path) -> bool:
    """Whether `folder` carries peftkit's marker file."""
    return (folder / MARKER_NAME).is_file()


def read_json_object(path: str | os.PathLike, what: str, data: bytes | None = None) -> dict[str, Any]:
    """The JSON object in file `path` (or in `data`, its bytes, when the caller has read them already); a file that
    is not valid UTF-8 JSON, or holds no object, is a one-line PeftkitError naming `what` the file should be
    (every JSON file peftkit reads goes through here)."""
    file = Path(path)
    try:
        value = json.loads(file.read_text() if data is None else data.decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PeftkitError(f"{file} is not valid JSON ({exc}); it should be {what}") from None
    except RecursionError:
        raise PeftkitError(f"{file} nests deeper than a JSON reader goes; it should be {what}") from None
    if not isinstance(value, dict):
        raise PeftkitError(f"{file} holds a JSON {type(value).__name__}, not an object; it should be {what}")
    return value


def save_tensors(tensors: dict[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, its I/O failures (a full disk, a read-only folder) raised as the OSError they are:
    safetensors reports them as its own SafetensorError ("... (os error 28)"), which no caller catches as a fault of
    the machine, so a full disk ended in a traceback instead of the CLI's one line."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        code = re.search(r"\(os error (\d+)\)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from exc
