"""Before launch: the memory estimate of a run and a preview of the examples it trains on.

Both go through the trainer's own code: `memory_estimate` is what `peftkit train` prints before its first step,
and the preview is the training split that `train.splits.load_splits` tokenizes for the objective (so a malformed
data file fails here with the same line the CLI prints). An example is shown as its tokens, grouped into runs of
trained tokens (label kept) and masked ones (label -100): exactly what the loss counts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from peftkit.core.labels import IGNORE_INDEX
from peftkit.errors import PeftkitError

GPU_SIZES_GB = (24.0, 48.0, 80.0)  # common cards (RTX 4090 / A6000 / A100-H100 80 GB)


def estimate(cfg: Any) -> dict[str, Any]:
    """The estimator's table for `cfg` on one process, and how many GPUs of each common size it needs; {"error":
    line} when the estimator declines the setup (the trainer then trains anyway, as here)."""
    from peftkit.io.models import load_model_config
    from peftkit.train.config import resolve_defaults
    from peftkit.train.reporting.memory_report import memory_estimate

    resolved = resolve_defaults(cfg)
    precision = {"auto": "amp", "fp16": "amp"}.get(resolved.precision, resolved.precision)  # the target is a GPU
    try:
        model_config = load_model_config(resolved.model)
        sized = [memory_estimate(resolved, model_config, precision, gpu_memory_gb=gb) for gb in GPU_SIZES_GB]
    except PeftkitError as exc:
        return {"error": str(exc)}
    first = sized[0]
    return {"precision": precision, "total_bytes": first.total_bytes, "breakdown": first.breakdown,
            "trainable_params": first.trainable_params, "total_params": first.total_params,
            "peak_phase": first.peak_phase, "assumptions": first.assumptions,
            "gpus": [{"gpu_gb": gb, "fits": est.fits, "gpus_needed": est.gpus_needed}
                     for gb, est in zip(GPU_SIZES_GB, sized, strict=True)]}


def data_preview(cfg: Any, rows: int = 3) -> dict[str, Any]:
    """The first `rows` training examples as the model sees them: for each tokenized part of an example (an SFT
    row; a pair's chosen and rejected rows; a KTO row), its text in runs of [text, trained]."""
    from peftkit.data.chat_templates import use_chat_template
    from peftkit.data.prompting import default_prompt_format
    from peftkit.io.models import load_tokenizer
    from peftkit.train import splits
    from peftkit.train.config import resolve_defaults

    resolved = resolve_defaults(cfg)
    tokenizer = load_tokenizer(resolved.model)
    prompt_format = use_chat_template(tokenizer, resolved.chat_template) or default_prompt_format(tokenizer)
    train, held_out, fmt = splits.load_splits(resolved, tokenizer, prompt_format)
    parts = _token_parts(train)
    examples = [[{"name": name, "runs": _runs(tokenizer, ids[i], labels[i])} for name, ids, labels in parts]
                for i in range(min(rows, len(train)))]
    return {"format": fmt, "train_rows": len(train), "eval_rows": len(held_out) if held_out is not None else 0,
            "examples": examples}


def data_columns(data: str) -> dict[str, Any]:
    """The columns of each data source and the names peftkit reads, for the page's column mapping (the CLI's
    `--columns peftkit_name=dataset_column`); a source that cannot be read is the CLI's one-line error."""
    from peftkit.data.mixing import KNOWN_COLUMNS, parse_mixture
    from peftkit.data.sources import load_rows

    sources = [{"source": source.path, "columns": list(load_rows(source.path).column_names)}
               for source in parse_mixture(data)]
    return {"sources": sources, "known": list(KNOWN_COLUMNS)}


def _token_parts(split: Any) -> list[tuple[str, list[list[int]], list[list[int]]]]:
    """(name, token ids per example, labels per example) for each tokenized part of a split: the fields named
    `<part>ids` with a `<part>labels` beside them (`input_ids` / `labels`, `chosen_ids` / `chosen_labels`, ...)."""
    names = [f.name for f in dataclasses.fields(split)] if dataclasses.is_dataclass(split) else list(vars(split))
    parts = []
    for name in names:
        if not name.endswith("ids") or name == "prompt_ids":
            continue
        stem = name[: -len("ids")]
        label_name = "labels" if stem == "input_" else f"{stem}labels"
        if label_name in names:
            parts.append(("example" if stem in ("", "input_") else stem.rstrip("_"), getattr(split, name), getattr(split, label_name)))
    if not parts:
        raise PeftkitError(f"no preview for data split {type(split).__name__}: it has no <part>_ids / "
                           "<part>_labels fields")
    return parts


def _runs(tokenizer: Any, ids: list[int], labels: list[int]) -> list[list[Any]]:
    """Consecutive tokens with the same trained / masked flag, decoded together: [[text, trained], ...]."""
    runs: list[list[Any]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            runs.append([tokenizer.decode(ids[start:i]), labels[start] != IGNORE_INDEX])
            start = i
    return runs
