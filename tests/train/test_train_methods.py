"""The trainer works for every registered method with no special case, plus `full` and `freeze`: two steps on a
tiny model lower the eval loss, and the saved result loads back (adapter -> load_adapter, and changes the
model's output; full / freeze -> from_pretrained, with exactly the trainable weights changed)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import peftkit
from peftkit.core.registry import method_names
from peftkit.train.config import load_train_config
from peftkit.train.run import train
from tests.tiny import save_tiny_checkpoint, write_rows

OPTIONS = {"lora": {"rank": 2}, "adapter": {"reduction_factor": 4}, "prefix": {"num_virtual_tokens": 3},
           "prompt": {"num_virtual_tokens": 3}, "freeze": {"set": {"layers": 1}}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    return save_tiny_checkpoint(root / "tiny"), write_rows(root / "d.jsonl", 8), write_rows(root / "e.jsonl", 2, 40)


@pytest.mark.parametrize("method", method_names())  # every registered method, full and freeze included
def test_method_trains_and_saves(method, tiny, tmp_path):
    model_dir, data, eval_data = tiny
    cfg = load_train_config(None, dict(model=str(model_dir), data=str(data), eval_data=str(eval_data), method=method,
                                 max_steps=2, batch_size=4, max_length=64, lr=1e-2, precision="fp32",
                                 output=str(tmp_path / "run"), **OPTIONS.get(method, {})))
    result = train(cfg, progress=False)
    assert result.after["loss"] < result.before["loss"]  # two steps at lr 1e-2 on the eval-like rows
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 1000
    if method in ("full", "freeze"):
        loaded = AutoModelForCausalLM.from_pretrained(result.saved)
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        changed = [n for n, p in loaded.named_parameters()
                   if not torch.equal(p, dict(base.named_parameters())[n])]
        assert changed and (method == "full" or all(".layers.1." in n for n in changed)), changed
    else:
        base, _ = peftkit.load_model(str(model_dir))
        peftkit.load_adapter(base, result.saved)
        ids = torch.tensor([[1, 20, 30, 40, 50]])
        with peftkit.disable_adapters(base):
            plain = base(ids).logits
        assert not torch.allclose(base(ids).logits, plain, atol=1e-4)
