"""`peftkit train` with the data options: --columns, mixtures (--data a:w,b:w and recipe lists), prompt-completion
rows and --chat-template (saved with the adapter, reused by generate)."""

from __future__ import annotations

import json

import pytest
import yaml

from peftkit.cli import main
from peftkit.data.chat_templates import TEMPLATES
from tests.tiny import save_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama whose tokenizer has NO chat template (a base model), and two small datasets in other names."""
    root = tmp_path_factory.mktemp("dataopts")
    model = save_tiny_checkpoint(root / "tiny")
    (model / "chat_template.jinja").unlink()
    qa = root / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"Say {w}.", "answer": w}) + "\n"
                          for w in ["red", "green", "blue", "cyan"] * 3))
    qa2 = root / "qa2.jsonl"
    qa2.write_text("".join(json.dumps({"question": f"Echo {w}.", "answer": w}) + "\n" for w in ["one", "two"] * 3))
    return model, qa, qa2


def _run(capsys, argv: list[str]) -> str:
    main(["train", "--quiet", "--max-steps", "1", "--batch-size", "2", "--max-length", "96", "--precision", "fp32",
          "--eval-split", "0", *argv])
    return capsys.readouterr().out


def _fails(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--quiet", "--max-steps", "1", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def test_columns_and_weighted_mixture_on_the_cli(tiny, tmp_path, capsys):
    model, qa, qa2 = tiny
    out = tmp_path / "run"
    printed = _run(capsys, ["--model", str(model), "--data", f"{qa}:0.5,{qa2}:0.5", "--columns",
                            "instruction=question,output=answer", "--output", str(out)])
    assert "data: 18 training examples (alpaca)" in printed  # 12 + 6 rows, half from each
    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert saved["data"] == f"{qa}:0.5,{qa2}:0.5"
    assert saved["columns"] == {"instruction": "question", "output": "answer"}
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_recipe_data_list_and_columns(tiny, tmp_path, capsys):
    model, qa, qa2 = tiny
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(model), "data": [{"path": str(qa), "weight": 2}, f"{qa2}:1"],
                                      "columns": {"prompt": "question", "completion": "answer"}}))
    main(["train", "--config", str(recipe), "--print-config"])
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["data"] == f"{qa}:2,{qa2}:1" and resolved["columns"]["prompt"] == "question"
    printed = _run(capsys, ["--config", str(recipe), "--output", str(tmp_path / "run")])
    assert "data: 18 training examples (prompt_completion)" in printed


def test_repeated_data_flags_concatenate(tiny, tmp_path, capsys):
    model, qa, qa2 = tiny
    printed = _run(capsys, ["--model", str(model), "--data", str(qa), "--data", str(qa2), "--columns",
                            "prompt=question", "--columns", "completion=answer", "--output", str(tmp_path / "run")])
    assert "data: 18 training examples (prompt_completion)" in printed


def test_missing_column_is_one_line_before_the_run_folder(tiny, tmp_path, capsys):
    model, qa, _ = tiny
    err = _fails(capsys, ["--model", str(model), "--data", str(qa), "--columns", "instruction=query,output=answer",
                          "--output", str(tmp_path / "run")])
    assert err.startswith("error: columns: instruction <- 'query'") and "question, answer" in err
    assert not (tmp_path / "run").exists()
    err = _fails(capsys, ["--model", str(model), "--data", str(qa), "--columns", "instruction",
                          "--output", str(tmp_path / "run")])
    assert "--columns expects peftkit_name=dataset_column" in err
    err = _fails(capsys, ["--model", str(model), "--data", f"{qa}:0.5,{qa}", "--output", str(tmp_path / "run")])
    assert "give a weight to every source" in err
    assert not (tmp_path / "run").exists()


def test_chat_template_is_trained_saved_and_reused_by_generate(tiny, tmp_path, capsys):
    from peftkit.cli._generation import Generator

    model, qa, _ = tiny
    out = tmp_path / "run"
    _run(capsys, ["--model", str(model), "--data", str(qa), "--columns", "instruction=question,output=answer",
                  "--chat-template", "alpaca", "--output", str(out)])
    meta = json.loads((out / "adapter" / "peftkit.json").read_text())
    assert meta["prompt_format"] == {"chat_template": (TEMPLATES / "alpaca.jinja").read_text()}
    generator = Generator(str(model), str(out / "adapter"), seed=0)
    assert generator.tokenizer.chat_template is None  # the base model still has none: the adapter carries it
    assert generator.prompt_text([{"role": "user", "content": "Say red."}]) == \
        "### Instruction:\nSay red.\n\n### Response:\n"


def test_chat_template_from_a_file_and_bad_choices(tiny, tmp_path, capsys):
    model, qa, _ = tiny
    args = ["--model", str(model), "--data", str(qa), "--columns", "instruction=question,output=answer"]
    err = _fails(capsys, [*args, "--chat-template", "vicuna", "--output", str(tmp_path / "run")])
    assert "neither a shipped template (alpaca, chatml, llama3) nor a Jinja file" in err
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }}")
    err = _fails(capsys, [*args, "--chat-template", str(broken), "--output", str(tmp_path / "run")])
    assert "not a valid Jinja template (line 1" in err
    assert not (tmp_path / "run").exists()
    mine = tmp_path / "mine.jinja"
    mine.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if m['role'] == 'assistant' %}"
                    "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    _run(capsys, [*args, "--chat-template", str(mine), "--output", str(tmp_path / "run")])
    meta = json.loads((tmp_path / "run" / "adapter" / "peftkit.json").read_text())
    assert meta["prompt_format"]["chat_template"] == mine.read_text()


def test_chat_template_is_saved_with_a_whole_model_tokenizer(tiny, tmp_path, capsys):
    from transformers import AutoTokenizer

    model, qa, _ = tiny
    out = tmp_path / "run"
    _run(capsys, ["--model", str(model), "--method", "full", "--data", str(qa), "--columns",
                  "instruction=question,output=answer", "--chat-template", "chatml", "--output", str(out)])
    text = (TEMPLATES / "chatml.jinja").read_text()
    assert AutoTokenizer.from_pretrained(out / "model").chat_template == text
    assert json.loads((out / "model" / "peftkit.json").read_text())["prompt_format"] == {"chat_template": text}
