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


def test_eval_base_adapter_and_full_fine_tune(tmp_path, capsys):
    """An adapter changes the numbers; forgetting = the general-text loss with the adapter minus with it switched
    off (0 for a plain model); an adapter or a whole fine-tune folder also reports the parameters and bytes it
    saved; a full fine-tune is compared with the base its peftkit.json records."""
    from safetensors.torch import load_file

    from peftkit.io.models import save_model_folder

    folder = save_tiny_checkpoint(tmp_path / "tiny")
    data = write_rows(tmp_path / "eval.jsonl", 5)
    base = _eval(capsys, ["--model", str(folder), "--data", str(data)])
    assert base["n_examples"] == 5 and base["n"] == 5 and base["exact_match"] == 0.0
    assert math.isclose(base["perplexity"], math.exp(base["loss"]), rel_tol=1e-9)
    assert base["targets"] > 5  # answer tokens plus the end-of-turn token of each row
    assert base["forgetting"] == 0.0 and base["general_loss"] == base["general_loss_base"] > 0
    assert "saved_parameters" not in base  # a plain model saved nothing

    model, tokenizer = peftkit.load_model(str(folder))
    peftkit.inject(model, peftkit.LoraConfig(r=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    peftkit.save_adapter(model, tmp_path / "adapter")
    tuned = _eval(capsys, ["--model", str(folder), "--adapter", str(tmp_path / "adapter"), "--data", str(data)])
    assert abs(tuned["loss"] - base["loss"]) > 1e-3
    assert math.isclose(tuned["general_loss_base"], base["general_loss"], rel_tol=1e-5)  # adapter off = the base
    assert abs(tuned["forgetting"]) > 1e-3
    assert math.isclose(tuned["forgetting"], tuned["general_loss"] - tuned["general_loss_base"], rel_tol=1e-9)
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    assert tuned["saved_parameters"] == sum(t.numel() for t in load_file(weights).values())
    assert tuned["saved_bytes"] == weights.stat().st_size

    whole, _ = peftkit.load_model(str(folder))
    with torch.no_grad():
        whole.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    save_model_folder(whole, tokenizer, tmp_path / "full", {"method": "full"})
    full = _eval(capsys, ["--model", str(tmp_path / "full"), "--data", str(data), "--max-examples", "1"])
    assert math.isclose(full["general_loss_base"], base["general_loss"], rel_tol=1e-5)  # the recorded base, loaded
    assert full["forgetting"] != 0.0
    shards = sorted((tmp_path / "full").glob("*.safetensors"))
    assert full["saved_parameters"] == sum(t.numel() for f in shards for t in load_file(f).values())
    assert full["saved_bytes"] == sum(f.stat().st_size for f in shards)


def test_eval_precision_is_auto_or_fp32(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        main(["eval", "--precision", "bf16"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --precision must be auto or fp32, got 'bf16'"
