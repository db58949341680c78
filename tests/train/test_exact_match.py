"""Exact match's generation (train/evaluate.py): a shared prompt prefix computed once generates the same tokens as
plain left padding; rows stop once they can no longer match, never before; batches respect their token budget."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from peftkit.io.models import embedded_folder
from peftkit.train.evaluate import Diverged, _token_batches
from peftkit.train.shared_prefix import prompt_batch
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
        shared_inputs = prompt_batch(model, prompts, 0, "cpu")
        assert "cache" in shared_inputs or "past_key_values" in shared_inputs  # the prefix was computed once
        shared = model.generate(**shared_inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    width = plain_inputs["input_ids"].shape[1]
    assert shared_inputs["input_ids"].shape[1] == width
    assert torch.equal(shared[:, width:], plain[:, width:])


def test_prompts_without_a_long_shared_prefix_are_left_padded_as_usual():
    model = tiny_model("llama")
    prompts = _prompts(3, (3, 7))
    inputs = prompt_batch(model, prompts, 0, "cpu")
    assert set(inputs) == {"input_ids", "attention_mask"}
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
    # row 0: a prefix of the (stripped) reference; row 1 went wrong two characters back; row 2: its last character
    # may still change; row 3: the whole reference and a space, which strip() drops; row 4: one character past the
    # reference is not settled yet, the next one is
    assert done.tolist() == [False, True, False, False, False]
    assert stop(_ids(["name=Ada!", "nbme=Ad", "name=Ad", "name=Ada \n", "name=Adaqq"]), None).tolist() == \
        [False, True, False, False, True]
    assert stop.stopped == [False, True, False, False, True]  # a stopped row stays stopped


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
    assert _token_batches([10, 10, 10, 10], 40) == [range(0, 4)]
    assert _token_batches([10, 30, 10, 10], 40) == [range(0, 1), range(1, 2), range(2, 4)]
    assert _token_batches([50, 5], 40) == [range(0, 1), range(1, 2)]  # a row over the budget still runs, alone
    assert _token_batches([], 40) == []
