"""Rows -> `input_ids` + `labels` (+ `length`), cached on disk through `datasets`.

labels[t] is the token the model must predict at position t (HF shifts by one inside the loss), or -100 where no
loss is taken: the prompt, the first token of every example (nothing precedes it, and in a packed row it would be
predicted from the previous example), and, later, padding. So `(labels != -100).sum()` is exactly the number of
predicted tokens, which the training loop uses to normalise the loss across gradient accumulation.
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import datasets
import jinja2
from datasets.fingerprint import Hasher

from peftkit.core.labels import IGNORE_INDEX
from peftkit.data.formats import check_format, to_example
from peftkit.data.prompting import default_prompt_format
from peftkit.data.rendering import Segment, render_segments, uses_special_prefix
from peftkit.errors import PeftkitError

PIPELINE_VERSION = 1  # bump when the encoding changes, to invalidate cached tokenized datasets
FEATURES = datasets.Features({
    "input_ids": datasets.Sequence(datasets.Value("int32")),
    "labels": datasets.Sequence(datasets.Value("int32")),
    "length": datasets.Value("int32"),
})
log = logging.getLogger("peftkit.data")


def encode_segments(tokenizer: Any, segments: list[Segment], special_prefix: bool) -> tuple[list[int], list[bool]]:
    """Token ids of the segments and, per token, whether it belongs to a target segment.

    Consecutive text segments are tokenized together (so tokens merge exactly as in the full text) and each token
    is assigned to the segment in which it starts, using the fast tokenizer's character offsets. Slow tokenizers
    (no offsets) tokenize each segment on its own.
    """
    ids: list[int] = _prefix_ids(tokenizer) if special_prefix else []
    targets: list[bool] = [False] * len(ids)
    run: list[tuple[str, bool]] = []
    for piece, target in [*segments, (None, False)]:
        if isinstance(piece, str):
            run.append((piece, target))
            continue
        if run:
            run_ids, run_targets = _encode_run(tokenizer, run)
            ids += run_ids
            targets += run_targets
            run = []
        if isinstance(piece, int):
            ids.append(piece)
            targets.append(target)
    return ids, targets


def _encode_run(tokenizer: Any, run: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    text = "".join(piece for piece, _ in run)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True) if tokenizer.is_fast else {}
    if "offset_mapping" not in enc:  # a Python ("slow") tokenizer has no character offsets
        ids: list[int] = []
        targets: list[bool] = []
        for piece, target in run:
            piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            ids += piece_ids
            targets += [target] * len(piece_ids)
        return ids, targets
    ends, flags, position = [], [], 0
    for piece, target in run:
        position += len(piece)
        ends.append(position)
        flags.append(target)
    targets, segment = [], 0
    for start, _ in enc["offset_mapping"]:
        while segment < len(ends) - 1 and start >= ends[segment]:
            segment += 1
        targets.append(flags[segment])
    return list(enc["input_ids"]), targets


def _prefix_ids(tokenizer: Any) -> list[int]:
    """[bos] when the tokenizer puts a BOS in front of plain text (Llama), else [] (GPT-2, Qwen)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def encode_example(
    example: Any, tokenizer: Any, prompt_format: dict[str, str], train_on_prompt: bool, char_bound: int | None = None
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one validated example, untruncated; labels[0] is always -100.

    char_bound: the most characters `max_length` tokens can hold (`max_chars`); an example whose text before its
    first target is longer cannot keep a target within max_length, so it is not tokenized: ([], []) at once (a
    50 MB row is dropped in milliseconds, not after minutes of tokenizing). Of a longer example only its first
    2 * char_bound characters are tokenized (`_clipped`): the first max_length tokens lie within char_bound of them,
    and the margin keeps the tokens near that point merging as in the whole text (a 50 MB answer costs no more).
    """
    segments = render_segments(example, tokenizer, prompt_format, train_on_prompt)
    if char_bound is not None:
        if _chars_before_target(segments) > char_bound:
            return [], []
        segments = _clipped(segments, 2 * char_bound)
    ids, targets = encode_segments(tokenizer, segments, uses_special_prefix(example, prompt_format))
    labels = [tok if target else IGNORE_INDEX for tok, target in zip(ids, targets, strict=True)]
    if labels:
        labels[0] = IGNORE_INDEX
    return ids, labels


def max_chars(tokenizer: Any, max_length: int) -> int:
    """The most characters `max_length` tokens can decode to: max_length times the longest vocabulary entry (a
    byte-level or SentencePiece entry has at least one character per decoded character)."""
    vocab: dict[str, int] = tokenizer.get_vocab()
    return max_length * max((len(token) for token in vocab), default=1)


def _clipped(segments: list[Segment], limit: int) -> list[Segment]:
    """The segments cut after `limit` characters of text (token ids count none; those after the cut are left out)."""
    out: list[Segment] = []
    for text, target in segments:
        if isinstance(text, str):
            if limit <= 0:
                break
            text, limit = text[:limit], limit - len(text)
        out.append((text, target))
    return out


def _chars_before_target(segments: list[Segment]) -> int:
    """Characters of the rendered text before the first target segment (all of it when none is a target)."""
    total = 0
    for text, target in segments:
        if target:
            break
        total += len(text) if isinstance(text, str) else 0  # a token id: counted as no characters (a lower bound)
    return total


def tokenize(
    dataset: datasets.Dataset,
    tokenizer: Any,
    *,
    fmt: str = "auto",
    max_length: int,
    prompt_format: dict[str, str] | None = None,
    train_on_prompt: bool = False,
) -> datasets.Dataset:
    """A dataset with columns `input_ids`, `labels` and `length`, one row per example that keeps a target.

    fmt: "auto" | "alpaca" | "messages" | "text". prompt_format: {"chat_template": ...} or {"plain_template": ...}
    (default: `prompting.default_prompt_format(tokenizer)`). Examples are truncated to max_length tokens; one whose
    targets are all cut is dropped (logged), and an error is raised when that drops every example.

    The result is written to `<cache>/datasets/tokenized-<key>.arrow` (cache = $PEFTKIT_CACHE or ~/.cache/peftkit)
    where key hashes the data's `datasets` fingerprint (content of in-memory data; path + mtime of files), the
    tokenizer, the format, max_length, the prompt format and train_on_prompt; a second call with the same inputs
    reads that file instead of tokenizing again.
    """
    if max_length < 2:
        raise PeftkitError(f"--max-length must be at least 2 tokens, got {max_length}")
    fmt = check_format(fmt, dataset.column_names)
    prompt_format = prompt_format or default_prompt_format(tokenizer)
    key = Hasher.hash([PIPELINE_VERSION, dataset._fingerprint, tokenizer_key(tokenizer), fmt, max_length,
                       sorted(prompt_format.items()), train_on_prompt])

    bound = max_chars(tokenizer, max_length)

    def encode_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
        for values, index in zip(zip(*batch.values(), strict=True), indices, strict=True):
            example = to_example(dict(zip(batch, values, strict=True)), fmt, index)
            ids, labels = _encode_row(example, index, tokenizer, prompt_format, train_on_prompt, bound)
            ids, labels = ids[:max_length], labels[:max_length]
            if any(label != IGNORE_INDEX for label in labels):
                out["input_ids"].append(ids)
                out["labels"].append(labels)
                out["length"].append(len(ids))
        return out

    folder = _cache_folder()
    folder.mkdir(parents=True, exist_ok=True)
    tokenized = dataset.map(
        encode_batch, batched=True, with_indices=True, remove_columns=dataset.column_names, features=FEATURES,
        cache_file_name=str(folder / f"tokenized-{key}.arrow"), new_fingerprint=key, desc="tokenizing",
    )
    dropped = len(dataset) - len(tokenized)
    if len(tokenized) == 0:
        shortest = _shortest_prompt(dataset, tokenizer, fmt, prompt_format, train_on_prompt, bound)
        raise PeftkitError(
            f"--max-length {max_length} cuts every target token of every example: the shortest prompt is "
            + (f"{shortest} tokens; use a --max-length well above {shortest}" if shortest is not None else
               f"longer than {bound:,} characters, more than {max_length} tokens can hold; shorten the prompts")
        )
    if dropped:
        log.warning("%d of %d examples dropped: --max-length %d cut all their target tokens",
                    dropped, len(dataset), max_length)
    return tokenized


def _encode_row(example: Any, index: int, tokenizer: Any, prompt_format: dict[str, str],
                train_on_prompt: bool, bound: int) -> tuple[list[int], list[int]]:
    """encode_example, with template failures reported as errors naming the row."""
    try:
        return encode_example(example, tokenizer, prompt_format, train_on_prompt, bound)
    except jinja2.TemplateError as exc:  # e.g. a template that refuses a system turn
        raise PeftkitError(f"row {index + 1}: the chat template cannot render this conversation: {exc}") from None
    except PeftkitError as exc:
        raise PeftkitError(f"row {index + 1}: {exc}") from None


def tokenizer_key(tokenizer: Any) -> str:
    """A hash of what decides the token ids: the backend's vocabulary, merges, normalizer and post-processor
    (not its mutable truncation / padding state), the special tokens and the chat template.

    The backend's JSON (a 49k vocabulary and as many merges for SmolLM2) is hashed as canonical text with sha256:
    `datasets`' Hasher pickles such a dict object by object, which took ~0.8 s per call (twice per run)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        core: Any = _backend_digest(backend.to_str())
    else:
        core = Hasher.hash(tokenizer)
    return Hasher.hash([type(tokenizer).__name__, core, tokenizer.all_special_tokens,
                        getattr(tokenizer, "chat_template", None)])


@lru_cache(maxsize=4)
def _backend_digest(spec_text: str) -> str:
    """sha256 of a backend's JSON without its truncation / padding state, keys sorted. Parsing and re-dumping 1.5 MB
    of JSON takes ~0.5 s, so the digest is remembered per exact text (a changed backend has another text)."""
    spec = json.loads(spec_text)
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _shortest_prompt(dataset: datasets.Dataset, tokenizer: Any, fmt: str, prompt_format: dict[str, str],
                     train_on_prompt: bool, bound: int, limit: int = 1000) -> int | None:
    """Fewest tokens before the first target, over the first `limit` rows (for the error message); None when
    every such prompt is longer than `bound` characters (not tokenized)."""
    shortest = None
    for index, row in enumerate(dataset.select(range(min(limit, len(dataset))))):
        ids, labels = encode_example(to_example(row, fmt, index), tokenizer, prompt_format, train_on_prompt, bound)
        if not ids:
            continue
        first = next((t for t, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
        shortest = first if shortest is None else min(shortest, first)
    return shortest


def _cache_folder() -> Path:
    from peftkit.io.models import cache_dir

    return cache_dir() / "datasets"
