"""TRL's prompt-completion rows: standard (strings, plain text) and conversational (lists of messages)."""

from __future__ import annotations

import datasets
import pytest

from peftkit.data import detect_format, tokenize
from peftkit.data.formats import Completion, check_format, to_example
from peftkit.errors import PeftkitError
from tests.data.test_tokenize import _target_runs


def test_detected_and_checked():
    assert detect_format(["prompt", "completion"]) == "prompt_completion"
    assert detect_format(["prompt", "completion", "text"]) == "prompt_completion"
    assert detect_format(["messages", "prompt", "completion"]) == "messages"
    assert check_format("prompt_completion", ["prompt", "completion", "id"]) == "prompt_completion"
    with pytest.raises(PeftkitError, match=r"needs the column\(s\) \['completion'\]"):
        check_format("prompt_completion", ["prompt", "text"])
    with pytest.raises(PeftkitError, match="--columns"):
        detect_format(["question", "answer"])


def test_rows_become_completions_or_conversations():
    assert to_example({"prompt": "The sky is", "completion": " blue."}, "prompt_completion", 0) == \
        Completion("The sky is", " blue.")
    chat = to_example({"prompt": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                                  {"role": "user", "content": "Q2"}],
                       "completion": [{"role": "assistant", "content": "A2"}]}, "prompt_completion", 0)
    assert chat == [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1", "train": False},
                    {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    with pytest.raises(PeftkitError, match="row 3: 'prompt' and 'completion' must both be text or both be lists"):
        to_example({"prompt": "x", "completion": [{"role": "assistant", "content": "y"}]}, "prompt_completion", 2)
    with pytest.raises(PeftkitError, match="row 1: the field 'completion' is missing"):
        to_example({"prompt": "x", "completion": None}, "prompt_completion", 0)
    with pytest.raises(PeftkitError, match="row 1: the completion has no assistant turn"):
        to_example({"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "user", "content": "Q"}]},
                   "prompt_completion", 0)


def test_standard_rows_are_plain_text_with_the_completion_as_target(plain):
    rows = datasets.Dataset.from_list([{"prompt": "say hello", "completion": " world"}])
    row = tokenize(rows, plain, max_length=64)[0]
    assert plain.decode(row["input_ids"]) == "<s>say hello world</s>"  # no template around it
    assert _target_runs(row, plain) == [" world</s>"]


def test_standard_rows_ignore_the_chat_template(smol):
    rows = datasets.Dataset.from_list([{"prompt": "The sky is", "completion": " blue."}])
    row = tokenize(rows, smol, max_length=64)[0]
    assert smol.decode(row["input_ids"]) == "The sky is blue.<|im_end|>"
    assert _target_runs(row, smol) == [" blue.<|im_end|>"]


def test_conversational_rows_train_only_the_completion(smol):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "One?"},
              {"role": "assistant", "content": "1"}, {"role": "user", "content": "Two?"}]
    rows = datasets.Dataset.from_list([{"prompt": prompt, "completion": [{"role": "assistant", "content": "2"}]}])
    row = tokenize(rows, smol, max_length=256)[0]
    assert _target_runs(row, smol) == ["2<|im_end|>"]
    # the same conversation as a messages row trains both answers; "train": false leaves one out
    full = prompt + [{"role": "assistant", "content": "2"}]
    both = tokenize(datasets.Dataset.from_list([{"messages": full}]), smol, max_length=256)[0]
    assert _target_runs(both, smol) == ["1<|im_end|>", "2<|im_end|>"]
    assert both["input_ids"] == row["input_ids"]
    marked = [dict(m, train=(m["content"] != "1")) if m["role"] == "assistant" else m for m in full]
    one = tokenize(datasets.Dataset.from_list([{"messages": marked}]), smol, max_length=256)[0]
    assert _target_runs(one, smol) == ["2<|im_end|>"]


def test_conversational_rows_with_the_plain_template(plain):
    prompt = [{"role": "user", "content": "say"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "again"}]
    rows = datasets.Dataset.from_list([{"prompt": prompt, "completion": [{"role": "assistant", "content": "world"}]}])
    row = tokenize(rows, plain, max_length=128)[0]
    assert _target_runs(row, plain) == ["world</s>"]
    assert "hello</s>" in plain.decode(row["input_ids"])  # the earlier answer is there, masked
