"""Recipes written for LLaMA-Factory, axolotl or TRL read as peftkit recipes; a typo gets a "did you mean"; the
resolved recipe can be printed and fed back."""

from __future__ import annotations

import pytest
import yaml

from peftkit.cli import main
from peftkit.errors import PeftkitError
from peftkit.train.config import load_train_config

LLAMA_FACTORY = """
model_name_or_path: some/model
finetuning_type: lora
lora_rank: 16
lora_target: all
learning_rate: 1.0e-4
num_train_epochs: 3.0
per_device_train_batch_size: 2
gradient_accumulation_steps: 8
lr_scheduler_type: cosine
warmup_ratio: 0.1
cutoff_len: 1024
output_dir: saves/run
"""

AXOLOTL = """
base_model: some/model
adapter: lora
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules: [q_proj, v_proj]
sequence_len: 4096
sample_packing: true
micro_batch_size: 2
num_epochs: 1
learning_rate: 0.0002
train_on_inputs: false
val_set_size: 0.05
"""


def _load(tmp_path, text):
    (tmp_path / "r.yaml").write_text(text)
    return load_train_config(tmp_path / "r.yaml")


def test_llama_factory_recipe(tmp_path):
    cfg = _load(tmp_path, LLAMA_FACTORY)
    assert (cfg.model, cfg.method, cfg.rank, cfg.target_modules, cfg.lr, cfg.epochs) == \
        ("some/model", "lora", 16, "all-linear", 1e-4, 3.0)
    assert (cfg.batch_size, cfg.grad_accum, cfg.scheduler, cfg.warmup, cfg.max_length, cfg.output) == \
        (2, 8, "cosine", 0.1, 1024, "saves/run")


def test_axolotl_recipe(tmp_path):
    cfg = _load(tmp_path, AXOLOTL)
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.target_modules, cfg.max_length) == (32, 16.0, 0.05, "q_proj,v_proj", 4096)
    assert (cfg.packing, cfg.batch_size, cfg.train_on_prompt, cfg.eval_split) == (True, 2, False, 0.05)
    linear = _load(tmp_path, "lora_target_linear: true\nlora_r: 8\n")
    assert linear.target_modules == "all-linear"


@pytest.mark.parametrize("text, needle", [
    ("lerning_rate: 1e-4", "did you mean 'lr'"),
    ("lora_rnk: 8", "did you mean 'rank'"),
    ("dataset: alpaca_en", "use data"),
    ("lr: 1e-4\nlearning_rate: 2e-4", "sets 'lr' twice"),
])
def test_unknown_and_conflicting_keys(tmp_path, text, needle):
    with pytest.raises(PeftkitError, match=needle):
        _load(tmp_path, text)


def test_print_config_is_a_loadable_recipe(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(AXOLOTL)
    main(["train", "--config", str(tmp_path / "r.yaml"), "--lr", "3e-4", "--print-config"])
    printed = capsys.readouterr().out
    resolved = yaml.safe_load(printed)
    assert resolved["lr"] == 3e-4 and resolved["rank"] == 32 and resolved["max_length"] == 4096  # flag wins
    (tmp_path / "again.yaml").write_text(printed)
    assert load_train_config(tmp_path / "again.yaml").to_dict() == resolved


# One precedence: flag > --set > recipe > default; the value ignored is named in a warning and in --print-config.

def _print_config(capsys, *args) -> tuple[dict, str, str]:
    main(["train", *args, "--print-config"])
    out = capsys.readouterr()
    return yaml.safe_load(out.out), out.out, out.err


def _line(printed: str, key: str) -> str:
    return next(line for line in printed.splitlines() if line.startswith(f"{key}:"))


def test_flag_wins_over_set_with_a_warning(capsys):
    resolved, printed, err = _print_config(capsys, "--method", "lora", "--rank", "8", "--set", "r=4")
    assert resolved["rank"] == 8 and resolved["set"] == {}
    assert _line(printed, "rank") == "rank: 8  # flag --rank (also --set r=4, ignored)"
    assert err == ("warning: rank: flag --rank 8 is used, --set r=4 is ignored "
                   "(precedence: flag > --set > recipe > default)\n")


def test_flag_wins_over_recipe_and_set_over_recipe(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("lora_r: 4\nlearning_rate: 1.0e-4\nset: {use_dora: true}\n")
    resolved, printed, err = _print_config(capsys, "--config", str(tmp_path / "r.yaml"), "--rank", "8")
    assert resolved["rank"] == 8 and resolved["lr"] == 1e-4 and resolved["set"] == {"use_dora": True}
    assert _line(printed, "rank") == "rank: 8  # flag --rank (also lora_r: 4 in recipe r.yaml, ignored)"
    assert _line(printed, "lr") == "lr: 0.0001  # recipe r.yaml (learning_rate)"
    assert _line(printed, "set") == "set: {use_dora: true}  # recipe r.yaml"
    assert "warning: rank: flag --rank 8 is used, lora_r: 4 in recipe r.yaml is ignored" in err
    resolved, printed, err = _print_config(capsys, "--config", str(tmp_path / "r.yaml"), "--set", "r=2")
    assert resolved["rank"] == 2 and _line(printed, "rank").endswith("# --set r=2 (also lora_r: 4 in recipe r.yaml, ignored)")


def test_same_value_twice_is_no_warning(capsys):
    resolved, printed, err = _print_config(capsys, "--rank", "8", "--set", "r=8")
    assert resolved["rank"] == 8 and err == "" and _line(printed, "rank") == "rank: 8  # flag --rank"


def test_print_config_says_where_defaults_came_from(tmp_path, capsys):
    resolved, printed, _ = _print_config(capsys, "--method", "lora", "--rank", "8")
    assert _line(printed, "lr") == "lr: 0.002  # default (bundled task)"
    assert _line(printed, "method") == "method: lora  # flag --method"
    assert _line(printed, "seed") == "seed: 0  # default"
    assert _line(printed, "packing") == "packing: false  # default"
    _, printed, _ = _print_config(capsys, "--method", "full", "--no-packing", "--data", "x.jsonl", "--data", "y.jsonl")
    assert _line(printed, "lr") == "lr: 2.0e-05  # default (method full)"
    assert _line(printed, "packing") == "packing: false  # flag --no-packing"
    assert _line(printed, "data") == "data: 'x.jsonl,y.jsonl'  # flag --data"
    (tmp_path / "again.yaml").write_text(printed)
    assert load_train_config(tmp_path / "again.yaml").data == "x.jsonl,y.jsonl"  # comments and all: a recipe
