"""Every recipe parses into a valid TrainConfig and starts with the command that runs it; the recipes for the
embedded model build and report (--dry-run) on a tiny model, writing nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from peftkit.cli import main
from peftkit.train.config import load_train_config
from peftkit.train.objectives import get_objective
from tests.tiny import save_tiny_checkpoint, write_rows

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TRAIN_RECIPES = sorted(p for p in RECIPES.glob("*.yaml") if not p.name.startswith("accelerate_"))
SMALL = [p for p in TRAIN_RECIPES if "model" not in yaml.safe_load(p.read_text())]


def test_there_is_a_recipe_per_method_and_the_big_ones():
    from peftkit.core.registry import method_names

    methods = {load_train_config(p).method for p in SMALL}
    assert methods >= set(method_names()) | {"full", "freeze"}
    assert {p.name for p in TRAIN_RECIPES} >= {"qwen1.5-7b-lora.yaml", "qwen1.5-72b-lora-fsdp.yaml"}


@pytest.mark.parametrize("recipe", TRAIN_RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_and_names_its_command(recipe):
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# ") and f"train --config recipes/{recipe.name}" in first
    assert load_train_config(recipe).method  # the recipe parses and names a method
    if "--config_file" in first:
        accel = RECIPES / first.split("--config_file ")[1].split()[0].removeprefix("recipes/")
        assert yaml.safe_load(accel.read_text())["distributed_type"] == "FSDP"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    return save_tiny_checkpoint(root / "tiny"), write_rows(root / "d.jsonl", 8)


@pytest.mark.parametrize("recipe", SMALL, ids=lambda p: p.stem)
def test_small_recipe_dry_run(recipe, tiny, tmp_path, monkeypatch, capsys):
    model, data = tiny
    monkeypatch.chdir(tmp_path)
    extra = ["--set", "layers=1"] if load_train_config(recipe).method == "freeze" else []  # the tiny model has 2 layers
    objective = get_objective(load_train_config(recipe).objective)
    for row in ({"chosen": "yes", "rejected": "no"}, {"completion": "yes", "label": True}):
        if objective.accepts(["prompt", *row]):  # a preference / KTO recipe needs its own rows
            data = tmp_path.parent / f"{recipe.stem}-rows.jsonl"
            data.write_text("".join(json.dumps({"prompt": f"q{i}", **row}) + "\n" for i in range(8)))
    main(["train", "--config", str(recipe), "--model", str(model), "--data", str(data), "--dry-run", "--quiet", *extra])
    out = capsys.readouterr().out
    assert "trainable" in out and "optimizer steps" in out
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing (no runs/ folder)
