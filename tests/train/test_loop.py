"""The loop's gradient accumulation: one step over micro-batches [0,1] + [2,3] (grad_accum 2) updates the weights
exactly like one micro-batch [0,1,2,3], even though the examples have very different numbers of target tokens
(a per-micro-batch mean would weigh them differently and fail this test)."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

import peftkit
from peftkit.train.checkpoints import Position
from peftkit.train.loop.fit import Loop, fit
from peftkit.train.loop.loss import micro_loss
from tests.tiny import save_tiny_checkpoint

# (prompt length, answer length) per example: answers of 1 and 9 tokens end up in different micro-batches.
SHAPES = [(5, 1), (4, 1), (3, 9), (6, 7)]


def _collate(indices: list[int]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(5, 500, (p + a,), generator=gen) for p, a in SHAPES]
    width = max(len(rows[i]) for i in indices)
    ids = torch.zeros(len(indices), width, dtype=torch.long)
    labels = torch.full((len(indices), width), -100)
    mask = torch.zeros(len(indices), width, dtype=torch.long)
    for r, i in enumerate(indices):
        p, a = SHAPES[i]
        ids[r, : p + a], mask[r, : p + a] = rows[i], 1
        labels[r, p : p + a] = rows[i][p:]
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _one_step(folder, plan: list[list[int]], grad_accum: int) -> dict[str, torch.Tensor]:
    model, _ = peftkit.load_model(str(folder))
    torch.manual_seed(0)
    peftkit.inject(model, peftkit.LoraConfig(r=2))
    with torch.no_grad():  # B = 0 would make A's gradient zero; give both factors values
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    AcceleratorState._reset_state()  # an earlier peftkit run in this process may have left bf16 autocast set
    loop = Loop(model, opt, sched, Accelerator(cpu=True), lambda epoch: plan, _collate, [10] * 4, total_steps=1,
                grad_accum=grad_accum, max_grad_norm=0.0)
    fit(loop, Position())
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_grad_accum_normalises_by_all_target_tokens(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "tiny")
    whole = _one_step(folder, [[0, 1, 2, 3]], grad_accum=1)
    split = _one_step(folder, [[0, 1], [2, 3]], grad_accum=2)
    for name in whole:
        assert torch.allclose(whole[name], split[name], atol=1e-6), name


def test_loss_paths_agree_on_the_embedded_tokenizer_model(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "tiny")
    model, _ = peftkit.load_model(str(folder))
    batch = _collate([0, 2, 3])
    full = micro_loss(model, batch, "full")
    for path in ("keep", "fused"):
        assert torch.allclose(micro_loss(model, batch, path), full, atol=1e-5), path


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import pytest

    from peftkit.errors import PeftkitError
    from peftkit.train.config import load_train_config
    from peftkit.train.objectives.sft import SftRun
    from peftkit.train.run import train
    from tests.tiny import write_rows

    folder = save_tiny_checkpoint(tmp_path / "tiny")
    real = SftRun.loss  # the loop asks the objective for each micro-batch's loss
    calls = {"n": 0}

    def poisoned(self, model, batch, path="fused"):
        calls["n"] += 1
        loss = real(self, model, batch, path)
        return loss * float("nan") if calls["n"] == 3 else loss  # step 3 (one micro-batch per step)

    monkeypatch.setattr(SftRun, "loss", poisoned)
    cfg = load_train_config(None, dict(model=str(folder), data=str(write_rows(tmp_path / "d.jsonl", 12)), eval_split="0",
                                 max_steps=5, batch_size=2, save_steps=2, precision="fp32", output=str(tmp_path / "run")))
    with pytest.raises(PeftkitError, match=r"nan at step 3.*step-000002"):
        train(cfg, progress=False)
    assert not (tmp_path / "run" / "adapter").exists()
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "trainable.safetensors").is_file()
