"""`peftkit train --method qlora`: the trainer loads the base quantized (the method's `load_options`), trains the
adapter (also 8-bit, also with gradient checkpointing) and saves a LoRA adapter recording its quantization.
(4-bit without options is covered by tests/train/test_train_methods.py, which trains every registered method.)"""

from __future__ import annotations

import json

import pytest
import torch

import peftkit
from peftkit.cli import main
from peftkit.train.config import load_train_config
from peftkit.train.run import train
from tests.tiny import save_tiny_checkpoint, write_rows


def test_qlora_8bit_with_checkpointing_trains(tmp_path):
    model_dir = save_tiny_checkpoint(tmp_path / "tiny")
    cfg = load_train_config(None, dict(model=str(model_dir), data=str(write_rows(tmp_path / "d.jsonl", 8)),
                                       eval_data=str(write_rows(tmp_path / "e.jsonl", 2, 40)), method="qlora",
                                       rank=2, set={"bits": 8}, gradient_checkpointing=True, max_steps=2,
                                       batch_size=4, max_length=64, lr=1e-2, precision="fp32",
                                       output=str(tmp_path / "run")))
    result = train(cfg, progress=False)
    assert result.after["loss"] < result.before["loss"]
    meta = json.loads((result.saved / "peftkit.json").read_text())
    assert meta["method"] == "qlora" and meta["quantization"]["bits"] == 8
    model, _ = peftkit.load_model(str(model_dir), quantize="int8")
    peftkit.load_adapter(model, result.saved)
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert b and all(p.abs().sum() > 0 for p in b)  # every B trained (B starts at zero)
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with peftkit.disable_adapters(model):
        plain = model(ids).logits
    assert not torch.allclose(model(ids).logits, plain, atol=1e-4)


def test_cli_refuses_bad_qlora_option(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--method", "qlora", "--set", "bits=3", "--max-steps", "1", "--output", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    assert "qlora bits must be 4 (NF4 / FP4) or 8, got 3" in capsys.readouterr().err
