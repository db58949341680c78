"""Preference rows: both shapes (text, conversational with or without a prompt column) give the same tokens as the
SFT pipeline, only the response scores, and bad rows are one-line errors naming the row."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from peftkit.core.labels import IGNORE_INDEX
from peftkit.data.preference import collate_pairs, pair_kind, to_pair, tokenize_pairs
from peftkit.data.prompting import PLAIN_TEMPLATE
from peftkit.data.tokenizing import encode_example
from peftkit.errors import PeftkitError
from peftkit.io.models import embedded_folder

TEXT = {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"}
CONVERSATIONAL = {"prompt": [{"role": "user", "content": "Capital of France?"}],
                  "chosen": [{"role": "assistant", "content": "Paris"}],
                  "rejected": [{"role": "assistant", "content": "Lyon"}]}
IMPLICIT = {"chosen": CONVERSATIONAL["prompt"] + CONVERSATIONAL["chosen"],
            "rejected": CONVERSATIONAL["prompt"] + CONVERSATIONAL["rejected"]}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(embedded_folder())


def _chat(tokenizer):
    return {"chat_template": tokenizer.chat_template}


def _scored(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])


def test_the_three_shapes_give_the_same_tokens_as_an_sft_row(tokenizer):
    fmt = _chat(tokenizer)
    got = [tokenize_pairs([row], tokenizer, max_length=256, prompt_format=fmt) for row in (TEXT, CONVERSATIONAL,
                                                                                            IMPLICIT)]
    assert [pair_kind(r) for r in (TEXT, CONVERSATIONAL, IMPLICIT)] == ["text", "conversational", "conversational"]
    for pairs in got[1:]:
        assert pairs.chosen_ids == got[0].chosen_ids and pairs.rejected_labels == got[0].rejected_labels
    sft_ids, sft_labels = encode_example([{"role": "user", "content": "Capital of France?"},
                                          {"role": "assistant", "content": "Paris"}], tokenizer, fmt, False)
    assert got[0].chosen_ids[0] == sft_ids and got[0].chosen_labels[0] == sft_labels
    assert _scored(tokenizer, got[0].chosen_ids[0], got[0].chosen_labels[0]) == "Paris<|im_end|>"
    assert _scored(tokenizer, got[0].rejected_ids[0], got[0].rejected_labels[0]) == "Lyon<|im_end|>"
    assert got[0].references == [([{"role": "user", "content": "Capital of France?"}], "Paris")]


def test_assistant_turns_inside_the_prompt_are_context(tokenizer):
    row = {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
                      {"role": "user", "content": "Capital of France?"}],
           "chosen": [{"role": "assistant", "content": "Paris"}],
           "rejected": [{"role": "assistant", "content": "Lyon"}]}
    for fmt in (_chat(tokenizer), {"plain_template": PLAIN_TEMPLATE}):
        pairs = tokenize_pairs([row], tokenizer, max_length=256, prompt_format=fmt)
        chosen = _scored(tokenizer, pairs.chosen_ids[0], pairs.chosen_labels[0])
        assert "Hello there" not in chosen and chosen.startswith("Paris")
        assert "Hello there" in tokenizer.decode(pairs.chosen_ids[0])


def test_collate_stacks_chosen_then_rejected(tokenizer):
    rows = [TEXT, {"prompt": "2 + 2?", "chosen": "4", "rejected": "five, surely"}]
    pairs = tokenize_pairs(rows, tokenizer, max_length=256, prompt_format=_chat(tokenizer))
    batch = collate_pairs(pairs, [1, 0], tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 4
    for row, ids in enumerate([pairs.chosen_ids[1], pairs.chosen_ids[0], pairs.rejected_ids[1],
                               pairs.rejected_ids[0]]):
        assert batch["input_ids"][row, :len(ids)].tolist() == ids
        assert int(batch["attention_mask"][row].sum()) == len(ids)
    assert "ref_chosen" not in batch
    pairs.ref_chosen, pairs.ref_rejected = [-1.0, -2.0], [-3.0, -4.0]
    batch = collate_pairs(pairs, [1, 0], tokenizer.pad_token_id)
    assert batch["ref_chosen"].tolist() == [-2.0, -1.0] and batch["ref_rejected"].tolist() == [-4.0, -3.0]


def test_truncation_drops_pairs_without_response_tokens(tokenizer):
    long_prompt = {**TEXT, "prompt": "word " * 100}
    pairs = tokenize_pairs([TEXT, long_prompt], tokenizer, max_length=40, prompt_format=_chat(tokenizer))
    assert len(pairs) == 1 and max(pairs.lengths) <= 80


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "a"}, "row 1: a preference row needs 'chosen' and 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}, "both be text or both"),
    ({"prompt": ["q"], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "message 1 must be a {role, content} object"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "'chosen' must end with an assistant message"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
     "differ only in their last"),
    ({"prompt": None, "chosen": "a", "rejected": "b"}, "'prompt' must be text too"),
])
def test_bad_rows_are_one_line_errors(row, message):
    with pytest.raises(PeftkitError, match="row 1") as err:
        to_pair(row, 0)
    assert message in str(err.value) and "\n" not in str(err.value)
