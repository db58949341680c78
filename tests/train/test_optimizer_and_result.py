"""The optimizer a run builds (torch's fused AdamW on a CPU, the same update as the default one) and the trained
model a run hands back (`RunResult.trained`: what loading the saved result gives)."""

from __future__ import annotations

import copy

import pytest
import torch

import peftkit
from peftkit.train.config import TrainConfig, load_train_config
from peftkit.train.evaluation.loading import load_for_inference
from peftkit.train.loop.optim import optimizer_and_schedule
from peftkit.train.run import train
from tests.tiny import save_tiny_checkpoint, tiny_input, tiny_model, write_rows


@pytest.mark.parametrize("method", ["lora", "full"])
def test_cpu_runs_step_with_the_fused_adamw_and_it_updates_like_the_default(method):
    model = tiny_model("llama")
    if method == "lora":
        peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules="all-linear"))
        for name, p in model.named_parameters():  # B = 0 would give A no gradient
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    default = copy.deepcopy(model)
    cfg = TrainConfig(method=method, lr=1e-2, warmup=0, weight_decay=0.1)
    fused, _ = optimizer_and_schedule(model, cfg, steps=4)
    plain, _ = optimizer_and_schedule(default, cfg, steps=4, sharded=True)  # FSDP / DeepSpeed: torch's default
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    ids = tiny_input()
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        for m, opt in ((model, fused), (default, plain)):
            opt.zero_grad()
            m(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    assert max(float((p - s).abs().max()) for p, s in zip(model.parameters(), start, strict=True)) > 1e-3
    for (name, p), q in zip(model.named_parameters(), default.parameters(), strict=True):
        assert float((p - q).abs().max()) <= 1e-5, name


def test_the_trained_model_handed_back_answers_like_the_saved_one(tmp_path):
    model = save_tiny_checkpoint(tmp_path / "tiny")
    write_rows(tmp_path / "rows.jsonl", 8)
    options = dict(model=str(model), data=str(tmp_path / "rows.jsonl"), eval_split="0", max_steps=2, batch_size=4,
                   max_length=64, lr=1e-2, rank=4, precision="fp32", output=str(tmp_path / "run"))
    result = train(load_train_config(None, options), progress=False)
    trained, loaded = result.trained, load_for_inference(str(model), str(result.saved))
    assert trained is not None and trained.prompt_format == loaded.prompt_format
    ids = tiny_input()
    trained.model.eval()
    with torch.no_grad():
        ours, theirs = trained.model(input_ids=ids).logits, loaded.model(input_ids=ids).logits
        base = load_for_inference(str(model), None).model(input_ids=ids).logits
    assert float((ours - base).abs().max()) > 1e-4  # trained: not the base
    assert float((ours - theirs).abs().max()) <= 1e-5
