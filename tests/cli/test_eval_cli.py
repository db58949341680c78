"""`peftkit eval`: loss / perplexity / exact match as JSON, and an adapter really changes the numbers."""

from __future__ import annotations

import json
import math

import torch

import peftkit
from peftkit.cli import main
from tests.tiny import save_tiny_checkpoint, write_rows


def _eval(capsys, argv):
    main(["eval", "--json", *argv])
    return json.loads(capsys.readouterr().out)


def test_eval_base_and_adapter(tmp_path, capsys):
    folder = save_tiny_checkpoint(tmp_path / "tiny")
    data = write_rows(tmp_path / "eval.jsonl", 5)
    base = _eval(capsys, ["--model", str(folder), "--data", str(data)])
    assert base["n_examples"] == 5 and base["n"] == 5 and base["exact_match"] == 0.0
    assert math.isclose(base["perplexity"], math.exp(base["loss"]), rel_tol=1e-9)
    assert base["targets"] > 5  # answer tokens plus the end-of-turn token of each row

    model, _ = peftkit.load_model(str(folder))
    peftkit.inject(model, peftkit.LoraConfig(r=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    peftkit.save_adapter(model, tmp_path / "adapter")
    tuned = _eval(capsys, ["--model", str(folder), "--adapter", str(tmp_path / "adapter"), "--data", str(data)])
    assert abs(tuned["loss"] - base["loss"]) > 1e-3
