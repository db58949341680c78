"""Several data sources mixed by weight, and column names mapped to peftkit's, before the format is detected.

    rows = load_mixture("a.jsonl:0.7,b.jsonl:0.3", columns={"instruction": "question"}, seed=0)

A *mixture spec* is one source (`"train.jsonl"`, a hub name, a datasets folder), several separated by commas, each
optionally with `:WEIGHT` (`"a.jsonl:0.7,b.jsonl:0.3"`), or a list of sources / `{"path": ..., "weight": ...}`
mappings (a recipe's `data:` list; `mixture_text` turns it into the string form that the config keeps).

Weights are relative shares of the mixed set, whose size is the sum of the sources' rows: with N rows in all, a
source of weight w contributes round(N * w / sum(weights)) rows, drawn without replacement (a source asked for more
rows than it has gives all of them, repeated, plus a random rest). The draw is seeded (the run's `--seed`), so the
same command mixes the same rows. Without weights the sources are concatenated. Sources must have the same
columns after the mapping (one format for the whole mixture).

`columns` maps peftkit's column names to the dataset's (`{"instruction": "question", "output": "answer"}`: peftkit's
`instruction` <- the dataset's `question`); a column named in the mapping that the data lacks is an error naming
the data's columns.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError

# the column names the formats read (formats.py)
KNOWN_COLUMNS = ("instruction", "input", "output", "messages", "conversations", "text", "prompt", "completion")


@dataclass(frozen=True)
class Source:
    """One data source of a mixture and its weight (None: unweighted)."""

    path: str
    weight: float | None = None


def parse_mixture(spec: str | list[Any]) -> list[Source]:
    """The sources of a mixture spec (see the module docstring); bad weights / entries are errors."""
    if isinstance(spec, str):
        if Path(spec).expanduser().exists():  # a single path that happens to contain "," or ":"
            return [Source(spec)]
        items: list[Any] = [part.strip() for part in spec.split(",") if part.strip()]
    else:
        items = list(spec)
    if not items:
        raise PeftkitError("data: no source given")
    sources = [_source(item) for item in items]
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        raise PeftkitError("data: give a weight to every source of a weighted mixture, or to none (then they are "
                           "concatenated); e.g. a.jsonl:0.7,b.jsonl:0.3")
    return sources


def mixture_text(spec: str | list[Any] | None) -> str | None:
    """A recipe's data list as the one-string form ("a.jsonl:0.7,b.jsonl:0.3"); a string is checked and returned
    as given; anything else is left for the config's type check."""
    if spec is None or not isinstance(spec, (str, list)):
        return spec
    if isinstance(spec, str):
        parse_mixture(spec)
        return spec
    return ",".join(s.path if s.weight is None else f"{s.path}:{s.weight:g}" for s in parse_mixture(spec))


def _source(item: Any) -> Source:
    if isinstance(item, dict):
        unknown = set(item) - {"path", "weight"}
        if unknown or not isinstance(item.get("path"), str):
            raise PeftkitError(f"data: each source is a path or {{path: ..., weight: ...}}, got {item!r}")
        return Source(item["path"], _weight(item.get("weight"), item["path"]))
    if not isinstance(item, str):
        raise PeftkitError(f"data: each source is a path or {{path: ..., weight: ...}}, got {item!r}")
    path, sep, tail = item.rpartition(":")
    if sep and _is_number(tail) and not Path(item).expanduser().exists():
        return Source(path, _weight(tail, path))
    return Source(item)


def _weight(value: Any, path: str) -> float | None:
    if value is None:
        return None
    weight = float(value) if isinstance(value, (int, float, str)) and _is_number(str(value)) else None
    if weight is None or not (0 < weight < float("inf")):
        raise PeftkitError(f"data: the weight of {path!r} must be a positive number, got {value!r}")
    return weight


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def map_columns(rows: Any, columns: dict[str, str] | None, name: str) -> Any:
    """`rows` (a datasets.Dataset) with the dataset's columns renamed to peftkit's (`columns`: ours -> theirs).
    A peftkit column the data already has under its own name is replaced by the mapped one."""
    if not columns:
        return rows
    have = list(rows.column_names)
    renames = {}
    for ours, theirs in columns.items():
        if ours not in KNOWN_COLUMNS:
            raise PeftkitError(f"columns: {ours!r} is not a column peftkit reads; map to one of "
                               f"{', '.join(KNOWN_COLUMNS)} (peftkit's name: the dataset's column)")
        if theirs not in have:
            raise PeftkitError(f"columns: {ours} <- {theirs!r}, but {name} has no column {theirs!r}; its columns "
                               f"are {', '.join(have)}")
        if theirs != ours:
            renames[theirs] = ours
    clash = [ours for ours in renames.values() if ours in have and ours not in renames]
    return rows.remove_columns(clash).rename_columns(renames)


def load_mixture(spec: str | list[Any], columns: dict[str, str] | None = None, seed: int = 0,
                 split: str | None = None) -> Any:
    """One datasets.Dataset from a mixture spec: each source loaded (`sources.load_rows`), its columns mapped, then
    weighted / concatenated (see the module docstring)."""
    import datasets

    from peftkit.data.sources import load_rows

    sources = parse_mixture(spec)
    parts = [map_columns(load_rows(s.path, split), columns, repr(s.path)) for s in sources]
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for source, part in zip(sources[1:], parts[1:], strict=True):
        if sorted(part.column_names) != sorted(first.column_names):
            raise PeftkitError(f"data: the sources of a mixture need the same columns (one format); "
                               f"{sources[0].path!r} has {', '.join(first.column_names)}, {source.path!r} has "
                               f"{', '.join(part.column_names)} (map them with columns:)")
    weights = [s.weight for s in sources if s.weight is not None]  # every source's or none (parse_mixture)
    if weights:
        parts = _weighted(parts, weights, seed)
    try:
        return datasets.concatenate_datasets(parts)  # aligns column order and all-null columns
    except ValueError as exc:
        raise PeftkitError(f"data: the sources of the mixture have columns of different types ({exc})") from None


def _weighted(parts: list[Any], weights: list[float], seed: int) -> list[Any]:
    """Each part resampled to its share of the total row count (seeded)."""
    total, norm = sum(len(p) for p in parts), sum(weights)
    rng = random.Random(f"mixture/{seed}")
    out = []
    for part, weight in zip(parts, weights, strict=True):
        want = max(1, round(total * weight / norm))
        whole, rest = divmod(want, len(part))
        indices = [i for _ in range(whole) for i in range(len(part))] + rng.sample(range(len(part)), rest)
        out.append(part.select(indices))
    return out
