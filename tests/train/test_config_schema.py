"""The training config schema: flags and recipes are coerced and checked before anything is loaded or written, so
a bad value is one line naming the field, exit 2, and the run folder is never created."""

from __future__ import annotations

import math

import pytest

import peftkit
from peftkit.cli import main
from peftkit.core.options import coerce, kinds_of
from peftkit.errors import PeftkitError
from peftkit.train.config import load_train_config


def test_yaml_1_1_scientific_notation_is_a_float(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1e-4\nwarmup: 5\nepochs: 2\nmax_length: 1e3\n")  # YAML 1.1 reads 1e-4 and 1e3 as text
    cfg = load_train_config(recipe)
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float) and cfg.max_length == 1000 and isinstance(cfg.max_length, int)


@pytest.mark.parametrize("recipe, field", [("seed: abc", "seed"), ("model: 123", "model"), ("packing: maybe", "packing"),
                                           ("batch_size: 2.5", "batch_size"), ("set: [1, 2]", "set")])
def test_recipe_type_errors_name_the_field(recipe, field, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(recipe + "\n")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(f"error: {field} must be") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--lr", "inf"], "lr must be a finite number"),
    (["--lr", "nan"], "lr must be a finite number"),
    (["--warmup", "nan"], "warmup must be a finite number"),
    (["--epochs", "inf"], "epochs must be a finite number"),
    (["--max-length", "100000000000000000000000"], "max_length must be"),
    (["--eval-split", "1.5"], "eval_split must be"),
    (["--target-modules", "q_(proj"], "not a valid regular expression"),
    (["--method", "prefix", "--num-virtual-tokens", "100000000"], "num_virtual_tokens must be"),
    (["--method", "nosuch"], "unknown method 'nosuch'"),
    (["--rank", "0"], "rank must be"),
    (["--set", "rnk=4"], "has no option 'rnk'"),
])
def test_absurd_flags_are_refused_before_anything_happens(flags, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", *flags, "-o", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and needle in err and err.count("\n") == 1 and err.startswith("error: "), err
    assert not (tmp_path / "run").exists()


def test_eval_split_larger_than_the_data_is_one_line(tmp_path, capsys):
    from tests.tiny import save_tiny_checkpoint, write_rows

    model = save_tiny_checkpoint(tmp_path / "tiny")
    rows = write_rows(tmp_path / "rows.jsonl", 10)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--quiet", "--model", str(model), "--data", str(rows), "--eval-split", "100",
              "-o", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "holds out all of the 10 training rows" in err.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value, hint, expected", [
    ("1e-4", float | None, 1e-4), (3, float, 3.0), ("7", int | None, 7), (4.0, int, 4), ("0.1", str | float | None, 0.1),
    ("validation", str | float | None, "validation"), (None, int | None, None), (True, bool, True),
])
def test_coerce_accepts_unambiguous_values(value, hint, expected):
    got = coerce("f", value, kinds_of(hint))
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("value, hint", [("abc", int), (True, int), (2.5, int), (123, str), ("yes", bool),
                                         (math.inf, int), ([1], float), (None, int)])
def test_coerce_refuses_the_rest(value, hint):
    with pytest.raises(PeftkitError, match="^f "):
        coerce("f", value, kinds_of(hint))


# One declaration: a flag, --set, a recipe (under any of its names) and the Python API give the same error line.

RANK_ERROR = "error: rank must be >= 1 and <= 65,536, got 70000\n"


def _error(args, tmp_path, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*args, "-o", str(tmp_path / "run")] if args[0] == "train" else args)
    assert exc.value.code == 2
    assert not (tmp_path / "run").exists()
    return capsys.readouterr().err


@pytest.mark.parametrize("args", [
    ["train", "--rank", "70000"], ["train", "--set", "r=70000"], ["train", "--set", "rank=70000"],
    ["train", "--method", "qlora", "--set", "r=70000"],
    ["estimate", "--model", "qwen1.5-7b", "--rank", "70000"], ["estimate", "--model", "qwen1.5-7b", "--set", "r=70000"],
])
def test_flag_and_set_give_the_same_error(args, tmp_path, capsys):
    assert _error(args, tmp_path, capsys) == RANK_ERROR


@pytest.mark.parametrize("recipe", ["lora_r: 70000", "rank: 70000", "lora_rank: 70000", "set: {r: 70000}"])
def test_recipe_and_python_give_the_same_error(recipe, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(recipe + "\n")
    assert _error(["train", "--config", str(tmp_path / "r.yaml")], tmp_path, capsys) == RANK_ERROR
    with pytest.raises(PeftkitError) as exc:
        peftkit.LoraConfig(r=70000)
    assert f"error: {exc.value}\n" == RANK_ERROR


@pytest.mark.parametrize("flag, setting", [(["--alpha", "0"], "lora_alpha=0"), (["--dropout", "1"], "lora_dropout=1"),
                                           (["--method", "prefix", "--num-virtual-tokens", "0"], "num_virtual_tokens=0")])
def test_other_shared_options_alike(flag, setting, tmp_path, capsys):
    method = flag[:2] if flag[0] == "--method" else []
    assert _error(["train", *flag], tmp_path, capsys) == _error(["train", *method, "--set", setting], tmp_path, capsys)


# --set: typed as the method config's field; a field behind a shared option is that option.

def test_set_values_are_typed_and_canonicalised():
    cfg = load_train_config(None, {"set": {"use_dora": "true", "lora_alpha": "16", "layers_to_transform": "1",
                                           "rank_pattern": "{q_proj: 4}"}})
    assert cfg.alpha == 16.0 and isinstance(cfg.alpha, float)  # lora_alpha is the shared option alpha
    assert cfg.set == {"use_dora": True, "layers_to_transform": [1], "rank_pattern": {"q_proj": 4}}
    assert load_train_config(None, {"method": "qlora", "set": {"bits": "8"}}).set == {"bits": 8}
    assert load_train_config(None, {"method": "freeze", "set": {"layers": "1"}}).set == {"layers": 1}


@pytest.mark.parametrize("pair, needle", [("use_dora=maybe", "use_dora must be true or false, got 'maybe'"),
                                          ("init=3", "unknown LoRA init '3'; choose one of default"),
                                          ("rnk=4", "method 'lora' has no option 'rnk'; valid options: alpha, "),
                                          ("r=abc", "rank must be a whole number, got 'abc'")])
def test_set_type_errors_are_one_line(pair, needle, tmp_path, capsys):
    err = _error(["train", "--set", pair], tmp_path, capsys)
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err


def test_set_twice_under_two_names_is_refused(tmp_path, capsys):
    err = _error(["train", "--set", "r=4", "--set", "rank=5"], tmp_path, capsys)
    assert "--set gives rank twice" in err
    (tmp_path / "r.yaml").write_text("lora_r: 8\nset: {r: 4}\n")
    assert "sets 'rank' twice" in _error(["train", "--config", str(tmp_path / "r.yaml")], tmp_path, capsys)
