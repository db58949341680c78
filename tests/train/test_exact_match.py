"""Exact match's greedy answers (train/evaluation/generation.py): what plain left-padded generate() produces, whether a row's
answer comes from its checked draft, from stopping once it can no longer match, or from generating; the shared
prompt prefix computed once; rows stop only when they can no longer match; batches respect their token budget."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from peftkit.io.models import embedded_folder
from peftkit.train.evaluation.generation import (
    Diverged,
    _continuation,
    greedy_answers,
    layout,
    may_still_match,
    token_batches,
)
from tests.tiny import ARCHS, tiny_model


def _prompts(shared: int, tails: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    head = torch.randint(1, 128, (shared,), generator=gen).tolist()
    return [head + torch.randint(1, 128, (n,), generator=gen).tolist() for n in tails]


def _left_padded(prompts: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("arch", ARCHS)
def test_a_shared_prompt_prefix_generates_what_left_padding_does(arch):
    model = tiny_model(arch)
    prompts = _prompts(20, (3, 7, 1, 5))
    with torch.no_grad():
        plain_inputs = _left_padded(prompts)
        plain = model.generate(**plain_inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
        inputs, width = layout(model, prompts, [], 0, "cpu")
        assert inputs["cached"] == 20  # the prefix was computed once
        shared_inputs = _continuation(model, inputs, width, list(range(len(prompts))))
        shared = model.generate(**shared_inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    width = plain_inputs["input_ids"].shape[1]
    assert shared_inputs["input_ids"].shape[1] == width
    assert torch.equal(shared[:, width:], plain[:, width:])


def test_prompts_without_a_long_shared_prefix_are_left_padded_as_usual():
    model = tiny_model("llama")
    prompts = _prompts(3, (3, 7))
    inputs, _ = layout(model, prompts, [], 0, "cpu")
    assert set(inputs) == {"input_ids", "attention_mask", "cached"} and inputs["cached"] == 0
    assert all(torch.equal(inputs[k], v) for k, v in _left_padded(prompts).items())


class _Chars:
    """A stand-in tokenizer: token id i is the character chr(i); 0 is padding (a special token)."""

    def batch_decode(self, rows: torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        return ["".join(chr(int(t)) for t in row if t) for row in rows]


def _ids(texts: list[str], start: int = 2) -> torch.Tensor:
    """Rows of 2 prompt tokens and then the answer, padded at the end (as finished rows are)."""
    width = max(len(text) for text in texts)
    return torch.tensor([[ord("#")] * start + [ord(c) for c in text] + [0] * (width - len(text)) for text in texts])


def test_diverged_stops_only_rows_that_can_no_longer_match():
    stop = Diverged(_Chars(), [" name=Ada ", "name=Ada", "name=Ada", "name=Ada", "name=Ada"], start=2)
    done = stop(_ids(["name=A", "nbme=A", "name=Ad", "name=Ada ", "name=Adaq"]), None)
    # row 0: a prefix of the (stripped) reference; row 1 went wrong; row 2: a prefix; row 3: the whole reference and
    # a space, which strip() drops; row 4: one character past the reference
    assert done.tolist() == [False, True, False, False, True]
    assert stop(_ids(["name=Ada!", "nbme=Ad", "name=Ad", "name=Ada \n", "name=Ad"]), None).tolist() == \
        [True, True, False, False, True]
    assert stop.stopped == [True, True, False, False, True]  # a stopped row stays stopped


def test_may_still_match_ignores_what_later_tokens_can_change():
    assert may_still_match(" name=A", "name=Ada") and may_still_match("name=Ada \n", " name=Ada ")
    assert not may_still_match("name=Ab", "name=Ada")
    assert may_still_match("city=Z\ufffd", "city=Zürich")  # half of a 2-byte character
    assert may_still_match("city=Zü", "city=Zürich") and may_still_match("city=Zx", "city=Zürich") is False
    assert may_still_match("city=Zé", "city=Zürich")  # a last non-ASCII character is not trusted yet


def test_diverged_waits_for_a_multibyte_character_spelled_in_byte_tokens():
    tokenizer = AutoTokenizer.from_pretrained(embedded_folder())
    reference = "city=Zürich"
    ids = tokenizer(reference, add_special_tokens=False)["input_ids"]
    stop = Diverged(tokenizer, [reference], start=0)
    for n in range(1, len(ids) + 1):  # every prefix of the reference's own tokens, partial characters included
        assert not stop(torch.tensor([ids[:n]]), None).item(), tokenizer.decode(ids[:n])
    wrong = tokenizer("city=Zug, date", add_special_tokens=False)["input_ids"]
    assert stop(torch.tensor([wrong]), None).item()


def test_token_batches_keep_rows_times_longest_within_the_budget():
    assert token_batches([10, 10, 10, 10], 40) == [range(0, 4)]
    assert token_batches([10, 30, 10, 10], 40) == [range(0, 1), range(1, 2), range(2, 4)]
    assert token_batches([50, 5], 40) == [range(0, 1), range(1, 2)]  # a row over the budget still runs, alone
    assert token_batches([], 40) == []


class _Latin:
    """A stand-in tokenizer for tiny models: id i >= 2 is chr(0x100 + i); 0 (padding) and 1 (end) are special."""

    pad_token_id, eos_token_id = 0, 1

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) - 0x100 for c in text]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(0x100 + int(i)) for i in ids if int(i) > 1)

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(row) for row in rows]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_greedy_answers_are_what_plain_generation_answers(arch):
    """References: the model's own greedy answers for rows 0-3 (their drafts check out), the same with one token
    changed for row 4, unrelated text for row 5. Hits and answers must be plain generate()'s; a cut answer is the
    start of plain generate()'s."""
    model, tok = tiny_model(arch), _Latin()
    prompts = _prompts(20, (3, 7, 1, 5, 4, 6), seed=2)
    with torch.no_grad():
        plain = model.generate(**_left_padded(prompts), max_new_tokens=8, do_sample=False, pad_token_id=0,
                               eos_token_id=1)
    texts = tok.batch_decode(plain[:, -8:])
    changed = texts[4][:3] + chr(0x100 + (ord(texts[4][3]) - 0x100) % 126 + 2) + texts[4][4:]
    references = [*texts[:4], changed, tok.decode([5, 6, 7])]
    with torch.no_grad():
        answers, cut = greedy_answers(model, tok, prompts, references, max_new_tokens=8)
    assert [a.strip() == r.strip() for a, r in zip(answers, references, strict=True)] == [True] * 4 + [False] * 2
    assert answers[:4] == texts[:4] and cut[4] and cut[5]
    assert all(texts[row].startswith(answers[row]) for row in (4, 5))
