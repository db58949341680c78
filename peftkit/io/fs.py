"""Filesystem safety for everything peftkit writes: outputs appear complete or not at all.

`atomic_dir` writes a folder beside its final place and renames it into place only when complete; `check_output`
refuses an existing output unless the user asked to overwrite it. Every command that writes a folder (adapters,
merged models, compressed adapters, checkpoints, the embedded model's conversion) goes through these.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError


def _umask_permissions(folder: Path) -> None:
    """Give the written files the permissions the user's umask asks for: safetensors creates its files 0600,
    which would hide an adapter or model from a server running as another user (vLLM, TGI)."""
    mask = os.umask(0)
    os.umask(mask)
    for file in folder.rglob("*"):
        if file.is_file():
            file.chmod(0o666 & ~mask)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` by renames, on error it is deleted.

    Readers never see a half-written folder: either the old content or the complete new one.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _umask_permissions(tmp)
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_json_object(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The JSON object in file `path`; a file that is not valid UTF-8 JSON, or holds no object, is a one-line
    PeftkitError naming `what` the file should be (every JSON file peftkit reads goes through here)."""
    file = Path(path)
    try:
        value = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PeftkitError(f"{file} is not valid JSON ({exc}); it should be {what}") from None
    if not isinstance(value, dict):
        raise PeftkitError(f"{file} holds a JSON {type(value).__name__}, not an object; it should be {what}")
    return value


def check_output(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an existing output folder unless --overwrite (checked before any work starts)."""
    if Path(path).exists() and not overwrite:
        raise PeftkitError(f"output {str(path)!r} already exists; pass --overwrite to replace it or choose another folder")
