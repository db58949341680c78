"""Which output targets a command may write, decided before any work starts (the output-folder policy).

Every command that writes a folder calls `check_output` first. It refuses, with one line:
- a target that is, or contains, the working directory, the home directory or a filesystem root;
- a target that is, contains, or lies inside one of the command's inputs (`merge -o` over the base model,
  `compress -o` over the fine-tune it reads);
- a target below a regular file, a symlink as target, a target whose nearest existing folder is not writable;
- an existing target without `--overwrite`, and with `--overwrite` a non-empty folder that peftkit did not write
  (no marker file, see `peftkit.io.fs.write_marker`): peftkit never deletes what it did not write.
The write itself then goes through `peftkit.io.fs.atomic_dir`, which swaps the new folder in only when complete.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.io.fs import MARKER_NAME, expect_new, refuse_protected, written_by_peftkit


def check_output(path: str | os.PathLike, overwrite: bool, *, inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Refuse an output target that the policy above forbids; called before any work starts."""
    target = check_target(path, inputs)
    if not target.exists():
        expect_new(target, True)  # found absent: the write must not replace what appears there meanwhile
        return
    if not overwrite:
        raise PeftkitError(f"output {str(path)!r} already exists; pass --overwrite to replace it or choose another folder")
    check_replaceable(target, str(path))
    expect_new(target, False)


def check_target(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """The target as a Path, after the checks that hold whether or not it exists (protected places, inputs, links,
    parents); an existing target must be a folder."""
    target = Path(path).expanduser()
    if target.is_symlink():
        raise PeftkitError(f"output {str(path)!r} is a symbolic link; give a real folder path (peftkit does not "
                           "write through links)")
    resolved = target.resolve()
    refuse_protected(resolved, str(path))
    refuse_inputs(resolved, str(path), inputs)
    _check_parents(target, str(path))
    if target.exists() and not target.is_dir():
        raise PeftkitError(f"output {str(path)!r} is a file, not a folder; choose another --output")
    return target


def check_replaceable(target: Path, shown: str) -> None:
    """--overwrite replaces an empty folder or one peftkit wrote, nothing else."""
    if any(target.iterdir()) and not written_by_peftkit(target):
        raise PeftkitError(f"output {shown!r} holds files peftkit did not write (no {MARKER_NAME}); --overwrite "
                           "replaces only peftkit's own outputs: choose another --output or empty the folder yourself")


def refuse_inputs(resolved: Path, shown: str, inputs: Iterable[str | os.PathLike | None]) -> None:
    """An input of the command must not be replaced, hold the output, or be held by it."""
    for item in inputs:
        if item is None:
            continue
        source = Path(item).expanduser().resolve()
        if source == resolved or resolved in source.parents or source in resolved.parents:
            raise PeftkitError(f"output {shown!r} overlaps the input {str(item)!r} the command reads; write the "
                               "result to a separate new folder")


def _check_parents(target: Path, shown: str) -> None:
    """The nearest existing ancestor must be a writable folder (not a file)."""
    parent = target.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PeftkitError(f"output {shown!r} lies below {str(parent)!r}, which is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PeftkitError(f"cannot write output {shown!r}: {str(parent)!r} is not writable (permission denied or "
                           "a read-only file system); choose another --output")
