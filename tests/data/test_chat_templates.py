"""The shipped chat templates: each renders, masks every answer with its end marker, and matches generation."""

from __future__ import annotations

from copy import deepcopy

import datasets
import pytest

from peftkit.data import tokenize
from peftkit.data.chat_templates import load_chat_template, named_templates, use_chat_template
from peftkit.data.prompting import PLAIN_TEMPLATE, render_prompt
from peftkit.errors import PeftkitError
from tests.data.test_tokenize import _target_runs

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "One?"},
        {"role": "assistant", "content": "1"}, {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "2"}]
# what each template puts after an answer (the end marker, trained with the answer)
END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "alpaca": "</s>"}


def test_the_shipped_names():
    assert named_templates() == ["alpaca", "chatml", "llama3"]


@pytest.mark.parametrize("name", ["chatml", "llama3", "alpaca"])
def test_every_answer_and_its_end_marker_is_the_target(plain, name):
    tokenizer = deepcopy(plain)  # a tokenizer without a chat template (the shared fixture stays untouched)
    prompt_format = use_chat_template(tokenizer, name)
    assert tokenizer.chat_template == prompt_format["chat_template"] == load_chat_template(name)
    row = tokenize(datasets.Dataset.from_list([{"messages": CHAT}]), tokenizer, max_length=512,
                   prompt_format=prompt_format)[0]
    runs = _target_runs(row, tokenizer)
    assert runs == [f"1{END[name]}", f"2{END[name]}"]
    prompt = render_prompt(tokenizer, CHAT[:4], prompt_format)
    full = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert full.startswith(prompt) and full[len(prompt):].startswith("2")


def test_alpaca_template_reads_like_the_plain_template(plain):
    tokenizer = deepcopy(plain)
    prompt_format = use_chat_template(tokenizer, "alpaca")
    assert render_prompt(tokenizer, "Say hi", prompt_format) == PLAIN_TEMPLATE.format(prompt="Say hi")


def test_no_choice_leaves_the_tokenizer_alone(plain):
    assert use_chat_template(plain, None) is None and plain.chat_template is None


def test_bad_choices(tmp_path):
    with pytest.raises(PeftkitError, match="'vicuna' is neither a shipped template"):
        load_chat_template("vicuna")
    (tmp_path / "empty.jinja").write_text(" \n")
    with pytest.raises(PeftkitError, match="is empty"):
        load_chat_template(str(tmp_path / "empty.jinja"))
    (tmp_path / "bad.jinja").write_text("{{ messages[0] ")
    with pytest.raises(PeftkitError, match="not a valid Jinja template"):
        load_chat_template(str(tmp_path / "bad.jinja"))
