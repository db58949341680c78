"""Where training rows come from: a local file, a `datasets.save_to_disk` folder, or a Hugging Face Hub dataset.

`load_rows` returns a plain `datasets.Dataset` (one split). Everything a user can get wrong here (a missing file,
an unsupported extension, a malformed JSONL line, an empty file, a hub name while offline) becomes a one-line
`PeftkitError` that says what is wrong and what would be right.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from peftkit.errors import PeftkitError

# file extension -> the `datasets` packaged builder that reads it
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_rows(source: str, split: str | None = None) -> datasets.Dataset:
    """The rows of `source` as one `datasets.Dataset`.

    source: a .json / .jsonl / .csv / .parquet file, a folder written by `Dataset.save_to_disk` (or
    `DatasetDict.save_to_disk`), or a hub dataset name such as "tatsu-lab/alpaca".
    split: which split to take ("train" when None). A local file has only "train".
    """
    path = Path(source).expanduser()
    if path.is_dir():
        rows = _load_folder(path, split)
    elif path.is_file():
        rows = _load_file(path, split)
    elif path.exists():  # a FIFO, a device (/dev/zero), a socket: reading it would block or never end
        raise PeftkitError(f"data file {source!r} is not a regular file (a pipe or a device?); give a data file")
    elif _looks_like_path(source):
        raise PeftkitError(f"data file {source!r} does not exist")
    else:
        rows = _load_hub(source, split)
    if len(rows) == 0:
        raise PeftkitError(f"dataset {source!r} is empty: it has no rows")
    return rows


def _looks_like_path(source: str) -> bool:
    """A string we read as a local path (and not a hub name like "owner/name")."""
    return (
        source.startswith((".", "/", "~"))
        or source.count("/") > 1
        or "\\" in source
        or Path(source).suffix.lower() in FILE_BUILDERS
    )


def _load_file(path: Path, split: str | None) -> datasets.Dataset:
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise PeftkitError(
            f"data file {str(path)!r} has unsupported extension {path.suffix!r}; "
            f"use one of {', '.join(FILE_BUILDERS)}, a save_to_disk folder, or a hub dataset name"
        )
    if split not in (None, "train"):
        raise PeftkitError(f"a single data file has only the 'train' split, not {split!r}; pass another file instead")
    if path.stat().st_size == 0:
        raise PeftkitError(f"data file {str(path)!r} is empty: it has no rows")
    if path.suffix.lower() == ".jsonl":
        _check_jsonl(path)  # pyarrow's error names no line; ours does
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # noqa: BLE001 - any reader failure is the user's file; say which and why
        if "corresponds to no data" in str(exc):  # datasets' words for a file with a header / blank lines only
            raise PeftkitError(f"data file {str(path)!r} is empty: it has no rows") from None
        raise PeftkitError(f"could not read {str(path)!r} as {path.suffix}: {_first_line(exc)}") from None


def _check_jsonl(path: Path) -> None:
    """Every non-blank line must be one JSON object; the first bad one is reported by its 1-based line number."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.strip()
            if not line:
                continue
            try:
                value = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise PeftkitError(f"{path}: line {number} is not valid JSON ({_first_line(exc)})") from None
            except RecursionError:
                raise PeftkitError(f"{path}: line {number} nests deeper than a JSON reader goes") from None
            if not isinstance(value, dict):
                raise PeftkitError(f"{path}: line {number} is a JSON {type(value).__name__}, expected an object {{...}}")


def _load_folder(path: Path, split: str | None) -> datasets.Dataset:
    if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise PeftkitError(
            f"data folder {str(path)!r} was not written by datasets' save_to_disk; point at a file or such a folder"
        )
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001
        raise PeftkitError(f"could not load the dataset folder {str(path)!r}: {_first_line(exc)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        return _pick_split(loaded, split, str(path))
    if split not in (None, "train"):
        raise PeftkitError(f"dataset folder {str(path)!r} holds a single split; drop the split {split!r}")
    return loaded


def _load_hub(name: str, split: str | None) -> datasets.Dataset:
    try:
        return datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - offline, unknown name, unknown split, gated: all end here
        raise PeftkitError(
            f"could not load split {split or 'train'!r} of dataset {name!r} from the Hugging Face Hub "
            f"({_first_line(exc)}); check the name and your network, or give a local .jsonl/.json/.csv/.parquet file"
        ) from None


def _pick_split(loaded: datasets.DatasetDict, split: str | None, name: str) -> datasets.Dataset:
    split = split or "train"
    if split not in loaded:
        raise PeftkitError(f"dataset {name!r} has no split {split!r}; it has: {', '.join(loaded)}")
    return loaded[split]


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (or its type), to keep errors one line long."""
    cause = exc
    # datasets wraps reader failures in a generic "An error occurred while generating the dataset"
    while cause.__cause__ is not None and (isinstance(cause, datasets.exceptions.DatasetsError) or not str(cause).strip()):
        cause = cause.__cause__
    text = str(cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__
