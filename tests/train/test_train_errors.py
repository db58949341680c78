"""Bad input to `peftkit train`: one line `error: ...`, exit code 2, no traceback, nothing written to --output."""

from __future__ import annotations

import json

import pytest

from peftkit.cli import main
from tests.tiny import save_tiny_checkpoint, write_rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    return root, save_tiny_checkpoint(root / "tiny")


def _fails(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--quiet", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]  # earlier lines: transformers' weight-loading bar, if the model was loaded
    assert last.startswith("error: "), err
    return last


def _args(root, model, data, out):
    return ["--model", str(model), "--data", str(data), "--output", str(out), "--max-steps", "1", "--precision", "fp32"]


def test_missing_data_file(tiny, capsys, tmp_path):
    root, model = tiny
    err = _fails(capsys, _args(root, model, tmp_path / "nope.jsonl", tmp_path / "out"))
    assert "nope.jsonl" in err
    assert not (tmp_path / "out").exists()


def test_empty_dataset(tiny, capsys, tmp_path):
    root, model = tiny
    (tmp_path / "empty.jsonl").write_text("")
    _fails(capsys, _args(root, model, tmp_path / "empty.jsonl", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_malformed_jsonl_line_is_named(tiny, capsys, tmp_path):
    root, model = tiny
    path = write_rows(tmp_path / "bad.jsonl", 4)
    lines = path.read_text().splitlines()
    lines[2] = '{"instruction": "x", "output": '
    path.write_text("\n".join(lines) + "\n")
    err = _fails(capsys, _args(root, model, path, tmp_path / "out"))
    assert "line 3" in err
    assert not (tmp_path / "out").exists()


def test_rows_missing_fields(tiny, capsys, tmp_path):
    root, model = tiny
    path = tmp_path / "missing.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "c"}) + "\n")
    err = _fails(capsys, _args(root, model, path, tmp_path / "out"))
    assert "output" in err
    assert not (tmp_path / "out").exists()


def test_max_length_cuts_every_target(tiny, capsys, tmp_path):
    root, model = tiny
    path = write_rows(tmp_path / "d.jsonl", 4)
    err = _fails(capsys, [*_args(root, model, path, tmp_path / "out"), "--max-length", "8"])
    assert "max-length" in err or "max_length" in err
    assert not (tmp_path / "out").exists()


def test_output_holding_another_run_and_resume_without_checkpoint(tiny, capsys, tmp_path):
    root, model = tiny
    path = write_rows(tmp_path / "d.jsonl", 4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "run_config.yaml").write_text("method: lora\n")
    err = _fails(capsys, _args(root, model, path, out))
    assert "--overwrite" in err and "--resume" in err
    err = _fails(capsys, [*_args(root, model, path, out), "--resume"])
    assert "checkpoint" in err
    assert sorted(p.name for p in out.iterdir()) == ["run_config.yaml"]


def test_unknown_recipe_key(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: lora\nlerning_rate: 1e-4\n")  # a typo; learning_rate itself is an accepted alias
    err = _fails(capsys, ["--config", str(recipe)])
    assert "lerning_rate" in err and "did you mean 'lr'" in err


def test_unknown_method_option(tiny, capsys, tmp_path):
    root, model = tiny
    path = write_rows(tmp_path / "d.jsonl", 4)
    err = _fails(capsys, [*_args(root, model, path, tmp_path / "out"), "--method", "full", "--rank", "4"])
    assert "rank" in err
    assert not (tmp_path / "out").exists()
