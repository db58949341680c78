"""Rows that cannot fit are found before tokenizing: a row whose prompt is longer than max_length tokens can hold
(max_length x the longest vocabulary entry, in characters) is dropped without being tokenized, so one huge row
costs milliseconds, not minutes; of a row whose answer is huge only the text the kept tokens can come from is
tokenized; rows that fit are tokenized exactly as before."""

from __future__ import annotations

import datasets
import pytest

import peftkit.data.tokenizing as tokenizing
from peftkit.data import tokenize
from peftkit.errors import PeftkitError

HUGE = "word " * 400_000  # 2 MB of prompt


def _rows(*instructions: str) -> datasets.Dataset:
    return datasets.Dataset.from_list([{"instruction": i, "input": "", "output": "yes"} for i in instructions])


def _spy(monkeypatch) -> list[int]:
    """The characters of text each example hands the tokenizer."""
    seen: list[int] = []
    real = tokenizing.encode_segments

    def spy(tokenizer, segments, special_prefix):
        seen.append(sum(len(text) for text, _ in segments if isinstance(text, str)))
        return real(tokenizer, segments, special_prefix)

    monkeypatch.setattr(tokenizing, "encode_segments", spy)
    return seen


def test_a_prompt_longer_than_max_length_can_hold_is_not_tokenized(smol, monkeypatch):
    seen = _spy(monkeypatch)
    kept = tokenize(_rows("Say yes.", HUGE), smol, max_length=64)
    assert len(kept) == 1 and max(seen) < 10_000  # the huge row never reached the tokenizer
    assert tokenizing.max_chars(smol, 64) < len(HUGE)

    exact = tokenize(_rows("Say yes."), smol, max_length=64)
    assert kept["input_ids"] == exact["input_ids"] and kept["labels"] == exact["labels"]


def test_only_huge_rows_is_one_line_without_tokenizing_them(smol):
    with pytest.raises(PeftkitError) as exc:
        tokenize(_rows(HUGE, HUGE), smol, max_length=64)
    assert "more than 64 tokens can hold" in str(exc.value) and "\n" not in str(exc.value)



def test_of_a_huge_answer_only_what_max_length_keeps_is_tokenized(smol, monkeypatch):
    answer = "word " * 4_000  # 20 kB: twice what 64 tokens can hold, and more
    rows = datasets.Dataset.from_list([{"instruction": "Say it.", "input": "", "output": answer}])
    whole = tokenize(rows, smol, max_length=10**6)["input_ids"][0][:64]
    seen = _spy(monkeypatch)
    kept = tokenize(rows, smol, max_length=64)
    assert max(seen) <= 2 * tokenizing.max_chars(smol, 64) < len(answer)  # the answer was not tokenized whole
    assert kept["length"] == [64] and kept["input_ids"][0] == whole  # the kept tokens are the same
