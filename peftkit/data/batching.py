"""Which examples go together in a micro-batch: lists of example indices, deterministic given (seed, epoch).

Without packing, a micro-batch is `batch_size` examples padded to the longest, so padding is wasted compute.
Grouping by length (as HF's `group_by_length`) cuts it: shuffle, cut into mega-chunks of 50 batches, sort each
chunk by length, and slice it into batches; batches are then shuffled, with the one holding the longest example
first so an out-of-memory error shows at step one, not hours in; only the last batch can be short.

With packing, examples are concatenated into one row with no padding (see collator.py). A micro-batch takes
examples up to a budget of `batch_size * max_length` tokens, filled first-fit (each example goes into the first
micro-batch of its chunk that still has room; longest first inside a chunk), so a packed micro-batch costs about
what an unpacked one of `batch_size` full-length rows would.

With a token budget (`batch_tokens`), an unpacked micro-batch is not a fixed number of rows but as many
length-sorted rows as fit in `batch_tokens` padded positions (rows x the longest row): short rows travel many to
a batch, long ones few, so every micro-batch costs about the same compute and activation memory (bounded by the
budget) and grouping by length no longer piles the longest rows into one oversized batch. With packing, the budget
replaces `batch_size * max_length`.
"""

from __future__ import annotations

import random

MEGA_CHUNK_BATCHES = 50  # batches per length-sorted mega-chunk (HF uses 50 too)
PACK_CHUNK_BINS = 64  # packed micro-batches filled at once: more packs tighter, fewer keeps the order random


def batches(
    lengths: list[int],
    *,
    batch_size: int,
    max_length: int,
    packing: bool,
    shuffle: bool,
    seed: int,
    epoch: int = 0,
    group_by_length: bool = True,
    batch_tokens: int | None = None,
) -> list[list[int]]:
    """Micro-batches (lists of indices into `lengths`) covering every example exactly once.

    The same (lengths, seed, epoch, settings) always gives the same batches, so a resumed run sees the same data
    order; another epoch gives another order. shuffle=False keeps the data order (eval), except that grouping by
    length still sorts inside each mega-chunk.
    """
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size and max_length must be positive, got {batch_size} and {max_length}")
    rng = random.Random(f"{seed}/{epoch}")
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if packing:
        result = _pack(order, lengths, batch_tokens or batch_size * max_length)
    elif batch_tokens:
        result = _budgeted(order, lengths, batch_tokens)
    elif group_by_length:
        result = _grouped(order, lengths, batch_size)
    else:
        result = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle and len(result) > 1:
        short_last = not packing and not batch_tokens and len(result[-1]) < batch_size
        _shuffle_batches(result, lengths, rng, keep_last=short_last)
    return result


def _shuffle_batches(result: list[list[int]], lengths: list[int], rng: random.Random, keep_last: bool) -> None:
    """Shuffle the batch order in place, the longest batch first; a short last batch (unpacked) stays last."""
    last = [result.pop()] if keep_last else []
    if result:
        longest = max(range(len(result)), key=lambda b: max(lengths[i] for i in result[b]))
        first = result.pop(longest)
        rng.shuffle(result)
        result.insert(0, first)
    result += last


def _grouped(order: list[int], lengths: list[int], batch_size: int) -> list[list[int]]:
    """Sort each mega-chunk of `order` by length (longest first), then slice it into batches."""
    chunk = batch_size * MEGA_CHUNK_BATCHES
    result = []
    for start in range(0, len(order), chunk):
        block = sorted(order[start : start + chunk], key=lambda i: -lengths[i])
        result += [block[i : i + batch_size] for i in range(0, len(block), batch_size)]
    return result


def _budgeted(order: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """Sort each mega-chunk by length (longest first), then cut it into runs of rows whose padded size
    (rows x the run's first, longest row) stays within `budget`. A mega-chunk holds about MEGA_CHUNK_BATCHES
    batches of rows of the mean length."""
    _check_fits(order, lengths, budget)
    mean = sum(lengths[i] for i in order) / max(len(order), 1)
    chunk = max(1, int(budget // max(mean, 1))) * MEGA_CHUNK_BATCHES
    result: list[list[int]] = []
    for start in range(0, len(order), chunk):
        batch: list[int] = []
        for index in sorted(order[start : start + chunk], key=lambda i: -lengths[i]):
            if batch and (len(batch) + 1) * lengths[batch[0]] > budget:
                result.append(batch)
                batch = []
            batch.append(index)
        result.append(batch)
    return result


def _check_fits(order: list[int], lengths: list[int], budget: int) -> None:
    too_long = next((i for i in order if lengths[i] > budget), None)
    if too_long is not None:
        raise ValueError(f"example {too_long} has {lengths[too_long]} tokens, more than the budget {budget}")


def _pack(order: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """First-fit-decreasing inside chunks of about PACK_CHUNK_BINS budgets of tokens."""
    _check_fits(order, lengths, budget)
    result: list[list[int]] = []
    chunk: list[int] = []
    tokens = 0
    for index in order + [None]:
        if index is not None:
            chunk.append(index)
            tokens += lengths[index]
        if chunk and (index is None or tokens >= PACK_CHUNK_BINS * budget):
            result += _first_fit(sorted(chunk, key=lambda i: -lengths[i]), lengths, budget)
            chunk, tokens = [], 0
    return result


def _first_fit(items: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    bins: list[list[int]] = []
    room: list[int] = []
    for index in items:
        size = lengths[index]
        slot = next((b for b, free in enumerate(room) if free >= size), None)
        if slot is None:
            bins.append([index])
            room.append(budget - size)
        else:
            bins[slot].append(index)
            room[slot] -= size
    return bins
