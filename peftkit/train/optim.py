"""The optimizer and the learning-rate schedule: AdamW over the trainable parameters, linear warmup, then cosine /
linear / constant; and how many optimizer steps a run takes."""

from __future__ import annotations

import math
from typing import Any

import torch

from peftkit.errors import PeftkitError
from peftkit.train.config import TrainConfig


def total_steps(cfg: TrainConfig, micro_per_epoch: int, world: int) -> int:
    """Optimizer steps: --max-steps, else epochs x micro-batches per epoch / (grad_accum x processes)."""
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * micro_per_epoch / (cfg.grad_accum * world)))


def optimizer_and_schedule(model: torch.nn.Module, cfg: TrainConfig, steps: int) -> tuple[Any, Any]:
    """AdamW over the trainable parameters, and a LambdaLR: linear warmup, then cosine / linear / constant."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PeftkitError("the model has no trainable parameter; check the method options")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup * steps) if cfg.warmup < 1 else int(cfg.warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, steps - warmup)
        if cfg.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
