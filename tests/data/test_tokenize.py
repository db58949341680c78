"""tokenize: chat-template and plain masking, the end token as a target, truncation, bad rows, the cache."""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
import pytest

import peftkit.data.tokenizing as tokenizing
from peftkit.data import IGNORE_INDEX, tokenize
from peftkit.data.prompting import PLAIN_TEMPLATE, alpaca_prompt, render_prompt
from peftkit.errors import PeftkitError

ALPACA = [{"instruction": "Repeat the word", "input": "apple", "output": "apple apple"},
          {"instruction": "Say hi", "input": None, "output": "hi"}]


def _target_runs(row: dict, tokenizer) -> list[str]:
    """The decoded runs of consecutive target tokens of one tokenized row."""
    runs, current = [], []
    for label in [*row["labels"], IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def test_chat_template_masks_prompt_and_trains_end_token(smol):
    out = tokenize(datasets.Dataset.from_list(ALPACA), smol, max_length=256)
    assert out.column_names == ["input_ids", "labels", "length"] and len(out) == 2
    for row, source in zip(out, ALPACA, strict=True):
        assert _target_runs(row, smol) == [source["output"] + "<|im_end|>"]
        assert row["length"] == len(row["input_ids"]) == len(row["labels"])
        # the masked prompt is exactly what generate() will feed the model
        prompt = render_prompt(smol, alpaca_prompt(source["instruction"], source["input"]))
        prompt_ids = smol(prompt, add_special_tokens=False)["input_ids"]
        assert row["input_ids"][: len(prompt_ids)] == prompt_ids
        assert set(row["labels"][: len(prompt_ids)]) == {IGNORE_INDEX}
        # labels equal input ids on targets
        assert all(lab in (IGNORE_INDEX, tok) for lab, tok in zip(row["labels"], row["input_ids"], strict=True))


def test_every_assistant_turn_is_a_target(smol):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "One?"},
            {"role": "assistant", "content": "1"}, {"role": "user", "content": "Two?"},
            {"role": "assistant", "content": "2"}]
    sharegpt = [{"from": "human", "value": "Three?"}, {"from": "gpt", "value": "3"}]
    rows = datasets.Dataset.from_list([{"messages": chat}])
    assert _target_runs(tokenize(rows, smol, max_length=256)[0], smol) == ["1<|im_end|>", "2<|im_end|>"]
    opening = [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Q"},
               {"role": "assistant", "content": "A"}]  # SmolLM2's template still writes its default system turn
    rows = datasets.Dataset.from_list([{"messages": opening}])
    assert _target_runs(tokenize(rows, smol, max_length=256)[0], smol) == ["Hello!<|im_end|>", "A<|im_end|>"]
    rows = datasets.Dataset.from_list([{"conversations": sharegpt}])
    assert _target_runs(tokenize(rows, smol, max_length=256)[0], smol) == ["3<|im_end|>"]


# Llama 3's layout (BOS written by the template, header, end-of-turn with no newline after it), with markers that are
# special tokens of SmolLM2's vocabulary so they stay single tokens as in the real Llama 3 tokenizer
LLAMA3_LIKE = (
    "{{ bos_token }}{% for m in messages %}{{ '<filename>' + m['role'] + '<file_sep>\n\n' "
    "+ m['content'] + '<|endoftext|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<filename>assistant<file_sep>\n\n' }}{% endif %}"
)


def test_other_templates_and_templates_we_refuse(smol):
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    rows = datasets.Dataset.from_list([{"messages": chat}])
    row = tokenize(rows, smol, max_length=256, prompt_format={"chat_template": LLAMA3_LIKE})[0]
    assert _target_runs(row, smol) == ["A1<|endoftext|>", "A2<|endoftext|>"]
    assert row["input_ids"][0] == smol.bos_token_id and smol.bos_token_id not in row["input_ids"][1:]
    refuses_system = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    with pytest.raises(PeftkitError, match="row 1: the chat template cannot render .*System role not supported"):
        tokenize(rows, smol, max_length=256, prompt_format={"chat_template": refuses_system})
    # renders only the last answer, so earlier answers vanish from longer renderings: cannot be masked reliably
    forgetful = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}|{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
    with pytest.raises(PeftkitError, match="row 1: the chat template renders a conversation differently"):
        tokenize(rows, smol, max_length=256, prompt_format={"chat_template": forgetful})


def test_plain_template_without_chat_template(plain):
    row = tokenize(datasets.Dataset.from_list(ALPACA[:1]), plain, max_length=256)[0]
    assert row["input_ids"][0] == plain.bos_token_id
    assert row["labels"][-1] == row["input_ids"][-1] == plain.eos_token_id  # EOS is a target
    assert plain.decode(row["input_ids"]) == (
        "<s>" + PLAIN_TEMPLATE.format(prompt="Repeat the word\n\napple") + "apple apple</s>")
    assert _target_runs(row, plain) == ["apple apple</s>"]


class _Slow:
    """The plain tokenizer seen as a Python tokenizer (no character offsets)."""

    is_fast = False

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, text, **kwargs):
        kwargs.pop("return_offsets_mapping", None)
        return self.inner(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_tokenizers_without_offsets_tokenize_piece_by_piece(plain):
    example = [{"role": "user", "content": "say hello"}, {"role": "assistant", "content": "hello world"}]
    fast = tokenizing.encode_example(example, plain, {"plain_template": PLAIN_TEMPLATE}, False)
    slow = tokenizing.encode_example(example, _Slow(plain), {"plain_template": PLAIN_TEMPLATE}, False)
    assert slow == fast  # the plain template's pieces meet at a newline, so both ways agree


def test_text_format_and_train_on_prompt(plain):
    row = tokenize(datasets.Dataset.from_list([{"text": "hello world"}]), plain, max_length=64)[0]
    assert plain.decode(row["input_ids"]) == "<s>hello world</s>"
    assert row["labels"][0] == IGNORE_INDEX and row["labels"][1:] == row["input_ids"][1:]
    row = tokenize(datasets.Dataset.from_list(ALPACA[:1]), plain, max_length=256, train_on_prompt=True)[0]
    assert row["labels"][0] == IGNORE_INDEX and row["labels"][1:] == row["input_ids"][1:]


def test_truncation_drops_untrainable_examples(plain, caplog):
    rows = datasets.Dataset.from_list([{"instruction": "x", "output": "y"},
                                       {"instruction": "a much longer instruction " * 4, "output": "y"}])
    short = len(tokenize(rows.select([0]), plain, max_length=256)[0]["input_ids"])
    with caplog.at_level(logging.WARNING, logger="peftkit.data"):
        out = tokenize(rows, plain, max_length=short)
    assert len(out) == 1 and max(out["length"]) == short and "1 of 2 examples dropped" in caplog.text
    with pytest.raises(PeftkitError) as info:
        tokenize(rows, plain, max_length=short - 2)
    prompt = short - 2  # the short example ends with its two targets: "y" and EOS
    assert f"the shortest prompt is {prompt} tokens" in str(info.value) and "--max-length" in str(info.value)


def test_bad_rows_are_named(plain):
    cases = [
        ([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": None}], "row 2: the field 'output'"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], "row 1: the conversation has no assistant turn"),
        ([{"messages": [{"role": "assistant", "content": "hi"}]}, {"messages": [{"role": "user"}]}], "row 2: message 1"),
        ([{"text": "ok"}, {"text": None}], "row 2: the field 'text' is missing"),
        ([{"instruction": ["c"], "output": "d"}], "row 1: the field 'instruction' must be text"),
    ]
    for rows, expected in cases:
        with pytest.raises(PeftkitError, match=expected):
            tokenize(datasets.Dataset.from_list(rows), plain, max_length=64)


def test_numbers_read_from_csv_count_as_text(plain):
    row = tokenize(datasets.Dataset.from_list([{"instruction": "1+2", "output": 3}]), plain, max_length=64)[0]
    assert _target_runs(row, plain) == ["3</s>"]


def test_second_call_hits_the_cache(plain, monkeypatch, tmp_path):
    calls = []
    real = tokenizing.encode_example
    monkeypatch.setattr(tokenizing, "encode_example", lambda *a: calls.append(1) or real(*a))
    path = tmp_path / "rows.jsonl"
    datasets.Dataset.from_list(ALPACA).to_json(str(path))
    first = tokenize(datasets.load_dataset("json", data_files=str(path), split="train"), plain, max_length=64)
    assert len(calls) == 2
    again = tokenize(datasets.load_dataset("json", data_files=str(path), split="train"), plain, max_length=64)
    assert len(calls) == 2, "same data, tokenizer and settings must be read from the cache"
    assert again["input_ids"] == first["input_ids"]
    assert Path(again.cache_files[0]["filename"]).parent == tmp_path / "cache" / "datasets"
    tokenize(datasets.load_dataset("json", data_files=str(path), split="train"), plain, max_length=65)
    assert len(calls) == 4, "another max_length is another cache entry"
    tokenize(datasets.load_dataset("json", data_files=str(path), split="train"), plain, max_length=64,
             train_on_prompt=True)
    assert len(calls) == 6, "another setting is another cache entry"


def test_tokenizer_key_ignores_truncation_and_padding_but_not_the_vocabulary(plain):
    import copy

    key = tokenizing.tokenizer_key(plain)
    assert tokenizing.tokenizer_key(copy.deepcopy(plain)) == key, "the key must not depend on the object"
    other = copy.deepcopy(plain)
    other.backend_tokenizer.enable_truncation(8)
    other.backend_tokenizer.enable_padding()
    assert tokenizing.tokenizer_key(other) == key, "truncation / padding state does not change the token ids"
    other.add_tokens(["zebra"])
    assert tokenizing.tokenizer_key(other) != key, "another vocabulary is another cache entry"
