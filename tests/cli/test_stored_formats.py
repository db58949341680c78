"""What an adapter stores about how it was trained is checked and used the same way by `generate`, `chat` and `eval`
(one loader, train/evaluation/loading.py): a broken or hostile prompt format in peftkit.json is one `error:` line
naming the file (exit code 2) from all three and is refused when saved; a QLoRA adapter's base is loaded quantized
as its peftkit.json records, unless --dequantized-base asks for the original weights."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

import peftkit
from peftkit.cli import main
from peftkit.errors import PeftkitError
from peftkit.io.models import embedded_folder
from peftkit.io.prompt_format import check_prompt_format
from peftkit.methods.qlora import QloraConfig
from peftkit.train.evaluation.loading import load_for_inference
from tests.tiny import QUANT, save_tiny_checkpoint, tiny_model, write_rows

HOSTILE = [
    {"chat_template": "{{ ().__class__.__bases__[0].__subclasses__() }}"},  # the sandbox's SecurityError
    {"chat_template": "{% for m in messages %}{{ 1 / 0 }}{% endfor %}"},
    {"chat_template": "{% if %}"},
    {"chat_template": "{{ messages[7]['content'] }}"},
    {"chat_template": "{% for i in range(99999) %}{{ 'x' * 99 }}{% endfor %}"},
    {"plain_template": "{prompt:>999999999}"},
    {"plain_template": "{prompt.__class__.__mro__}"},
    {"plain_template": "{question}"},
    {"plain_template": "{"},
    {"plain_template": ""},
    {"chat_template": "{{ messages }}", "plain_template": "{prompt}"},
    ["not", "a", "format"],
]


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_a_broken_or_hostile_format_is_one_line_naming_where(value):
    with pytest.raises(PeftkitError) as exc:
        check_prompt_format(value, "A/peftkit.json")
    assert str(exc.value).startswith("A/peftkit.json: ") and "\n" not in str(exc.value)


def test_shipped_formats_pass():
    from peftkit.data.chat_templates import load_chat_template, named_templates
    from peftkit.data.prompting import PLAIN_TEMPLATE, default_prompt_format

    for name in named_templates():
        check_prompt_format({"chat_template": load_chat_template(name)}, name)
    check_prompt_format({"plain_template": PLAIN_TEMPLATE}, "plain")
    check_prompt_format(default_prompt_format(AutoTokenizer.from_pretrained(embedded_folder())), "embedded")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    base = save_tiny_checkpoint(root / "tiny")
    model = tiny_model("llama")
    peftkit.inject(model, peftkit.LoraConfig(r=2))
    peftkit.save_adapter(model, root / "adapter", prompt_format={"plain_template": "Q: {prompt}\nA: "})
    return base, root / "adapter", write_rows(root / "eval.jsonl", 2)


def test_save_refuses_a_broken_format_and_writes_nothing(tmp_path):
    model = tiny_model("llama")
    peftkit.inject(model, peftkit.LoraConfig(r=2))
    with pytest.raises(PeftkitError, match="plain template has the field"):
        peftkit.save_adapter(model, tmp_path / "a", prompt_format={"plain_template": "{prompt:>99999999}"})
    assert list(tmp_path.iterdir()) == []


def test_generate_chat_and_eval_refuse_it_alike(adapter, tmp_path, capsys, monkeypatch, value=HOSTILE[0]):
    base, saved, rows = adapter
    meta = json.loads((saved / "peftkit.json").read_text())
    broken = tmp_path / "adapter"
    broken.mkdir()
    for file in saved.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    (broken / "peftkit.json").write_text(json.dumps({**meta, "prompt_format": value}))
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("hi\n"))
    for argv in (["generate", "hi"], ["chat"], ["eval", "--data", str(rows)]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--model", str(base), "--adapter", str(broken)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "Traceback" not in err, err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(f"error: {broken / 'peftkit.json'}: "), err


def test_a_qlora_adapter_runs_over_the_quantized_base_it_records(tmp_path):
    import bitsandbytes as bnb

    base = tmp_path / "base"
    tiny_model("llama", QUANT).save_pretrained(base)
    AutoTokenizer.from_pretrained(embedded_folder()).save_pretrained(base)
    model, _ = peftkit.load_model(str(base), dtype="fp32", quantize="fp4", double_quant=False)
    peftkit.inject(model, QloraConfig(r=2))
    peftkit.save_adapter(model, tmp_path / "qlora")
    layers = {type(m) for m in load_for_inference(str(base), str(tmp_path / "qlora")).model.modules()}
    assert bnb.nn.Linear4bit in layers
    layers = {type(m) for m in load_for_inference(str(base), str(tmp_path / "qlora"), dequantized=True).model.modules()}
    assert bnb.nn.Linear4bit not in layers

    meta_file = tmp_path / "qlora" / "peftkit.json"
    meta = json.loads(meta_file.read_text())
    assert meta["quantization"]["quant_type"] == "fp4" and meta["quantization"]["double_quant"] is False
    meta_file.write_text(json.dumps({**meta, "quantization": {"bits": 3}}))
    with pytest.raises(PeftkitError, match="recorded quantization"):
        load_for_inference(str(base), str(tmp_path / "qlora"))
