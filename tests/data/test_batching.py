"""batches (determinism, coverage, grouping, token budget) and collate (padding by position, packing)."""

from __future__ import annotations

import random

import pytest
import torch

from peftkit.data import IGNORE_INDEX, batches, collate
from tests.tiny import SMALL, tiny_model

_RNG = random.Random(0)
LENGTHS = [_RNG.randint(3, 64) for _ in range(517)]


def _flat(result: list[list[int]]) -> list[int]:
    return [index for batch in result for index in batch]


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_cover_every_index_once_and_are_deterministic(packing, shuffle):
    kwargs = dict(batch_size=4, max_length=64, packing=packing, shuffle=shuffle, seed=3)
    first = batches(LENGTHS, **kwargs)
    assert sorted(_flat(first)) == list(range(len(LENGTHS)))
    assert batches(LENGTHS, **kwargs) == first
    assert batches(LENGTHS, **kwargs, epoch=0) == first
    if shuffle:
        assert _flat(batches(LENGTHS, **kwargs, epoch=1)) != _flat(first)
        assert _flat(batches(LENGTHS, **{**kwargs, "seed": 4})) != _flat(first)


def test_unpacked_batches_group_by_length():
    def padding(result):
        return sum(len(b) * max(LENGTHS[i] for i in b) - sum(LENGTHS[i] for i in b) for b in result)

    kwargs = dict(batch_size=8, max_length=64, packing=False, shuffle=True, seed=0)
    grouped, random_order = batches(LENGTHS, **kwargs), batches(LENGTHS, **kwargs, group_by_length=False)
    assert all(len(b) == 8 for b in grouped[:-1]) and len(grouped) == len(random_order) == 65
    assert padding(grouped) < padding(random_order) / 5
    assert max(LENGTHS[i] for i in grouped[0]) == max(LENGTHS), "the longest batch comes first"
    assert len(grouped[-1]) == len(LENGTHS) % 8, "only the last batch is short"


def test_packed_batches_respect_the_token_budget():
    result = batches(LENGTHS, batch_size=4, max_length=64, packing=True, shuffle=True, seed=0)
    totals = [sum(LENGTHS[i] for i in b) for b in result]
    assert max(totals) <= 4 * 64
    assert len(result) <= sum(LENGTHS) / (4 * 64) * 1.1 + 1, "first-fit should leave little room unused"
    with pytest.raises(ValueError, match="more than the budget"):
        batches([10, 300], batch_size=1, max_length=64, packing=True, shuffle=False, seed=0)


@pytest.mark.parametrize("shuffle", [False, True])
def test_token_budget_batches_bound_padded_size_and_cover_every_index(shuffle):
    # Long-tailed lengths: a few long rows among many short ones.
    rng = random.Random(1)
    lengths = [min(512, int(20 / (1 - rng.random()) ** 0.8)) for _ in range(400)]
    kwargs = dict(batch_size=8, max_length=512, packing=False, shuffle=shuffle, seed=2, batch_tokens=1024)
    result = batches(lengths, **kwargs)
    assert sorted(_flat(result)) == list(range(len(lengths)))
    assert batches(lengths, **kwargs) == result
    padded = [len(b) * max(lengths[i] for i in b) for b in result]
    assert max(padded) <= 1024, "every micro-batch fits the budget"
    rows = [len(b) for b in result]
    assert max(rows) > 8 > min(rows), "short rows travel many to a batch, long ones few"
    # With a fixed row count the longest rows pile up into one oversized batch.
    fixed = batches(lengths, **{**kwargs, "batch_tokens": None})
    assert max(len(b) * max(lengths[i] for i in b) for b in fixed) > 1024
    # Few batches are far below the budget (length grouping keeps rows alike).
    assert sum(padded) / (len(result) * 1024) > 0.7
    if shuffle:
        assert max(lengths[i] for i in result[0]) == max(lengths), "the longest batch comes first"


def test_token_budget_refuses_a_row_longer_than_the_budget():
    with pytest.raises(ValueError, match="more than the budget"):
        batches([10, 300], batch_size=1, max_length=512, packing=False, shuffle=False, seed=0, batch_tokens=256)


def test_padding_is_masked_by_position_even_when_pad_is_eos():
    eos = pad = 2
    examples = [{"input_ids": [5, 6, 7, eos], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, eos]},
                {"input_ids": [5, eos], "labels": [IGNORE_INDEX, eos]}]
    batch = collate(examples, pad_token_id=pad, packing=False)
    assert batch["input_ids"].tolist() == [[5, 6, 7, eos], [5, eos, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]  # the real EOS stays visible
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7, eos], [IGNORE_INDEX, eos, IGNORE_INDEX,
                                                                                IGNORE_INDEX]]
    assert batch["num_targets"].item() == 3


def test_packed_row_layout():
    examples = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    batch = collate(examples, pad_token_id=0, packing=True)
    assert set(batch) == {"input_ids", "position_ids", "labels", "num_targets"}, "no attention_mask when packed"
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]], "no target across a boundary"
    assert batch["num_targets"].item() == 3


def _examples(lengths: tuple[int, ...]) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in lengths:
        ids = torch.randint(0, SMALL.vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]})
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_packed_and_padded_logits_equal_each_example_alone_in_training_mode(kind):
    model = tiny_model(kind).train()  # tiny configs have dropout 0, so train mode is deterministic
    examples = _examples((7, 12, 5))
    alone = [model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0] for e in examples]

    packed = collate(examples, pad_token_id=0, packing=True)
    logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
    for single, part in zip(alone, logits.split([len(e["input_ids"]) for e in examples]), strict=True):
        torch.testing.assert_close(part, single, atol=1e-5, rtol=0)

    padded = collate(examples, pad_token_id=0, packing=False)
    logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False).logits
    for row, single in enumerate(alone):
        torch.testing.assert_close(logits[row, : len(single)], single, atol=1e-5, rtol=0)

    # control: without restarting positions the second example sees the first, so the check above can fail
    running = torch.arange(packed["input_ids"].shape[1])[None]
    leaked = model(input_ids=packed["input_ids"], position_ids=running, use_cache=False).logits[0]
    assert (leaked[7:19] - alone[1]).abs().max() > 1e-3


def test_packed_loss_counts_only_each_examples_own_targets():
    model = tiny_model("llama").train()
    examples = _examples((6, 9, 4))
    packed = collate(examples, pad_token_id=0, packing=True)
    batch = {k: v for k, v in packed.items() if k != "num_targets"}
    total = model(**batch, use_cache=False, num_items_in_batch=packed["num_targets"]).loss * packed["num_targets"]
    separate = 0.0
    for e in examples:
        out = model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]]), use_cache=False)
        separate += out.loss * (len(e["labels"]) - 1)
    torch.testing.assert_close(total, separate, atol=1e-4, rtol=1e-5)
