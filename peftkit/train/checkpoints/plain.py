"""The trained state of an unsharded run in a checkpoint: one file for the parameters, two for the optimizer.

    trainable.safetensors   every parameter with requires_grad, by its name in the model: the live training
                            state (e.g. LoRA's A and B as trained), not the folded PEFT export
    optimizer.safetensors   every tensor of the optimizer's state_dict()["state"], keyed `state.<param index>.<name>`
                            (AdamW: `exp_avg`, `exp_avg_sq`, and `step`, a 0-d float32 tensor)
    optimizer.json          {"format": 1, "state": skeleton of the optimizer's state_dict()}: `param_groups` with
                            every per-group option (lr, betas, eps, weight_decay, initial_lr, params, ...) and the
                            non-tensor state entries; each tensor is {"__tensor__": "<key in optimizer.safetensors>"}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.io.fs import save_tensors
from peftkit.train.checkpoints.checks import (
    apply_state,
    check_optimizer,
    check_scheduler,
    check_trainable,
    load_scheduler,
    or_earlier,
)
from peftkit.train.checkpoints.position import Position, read_position
from peftkit.train.checkpoints.rng import load_rng, set_rng_state
from peftkit.train.checkpoints.state import load_state_dict, read_tensors, save_state_dict

TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: tensor} of the parameters being trained (CPU copies)."""
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_plain(folder: Path, model: nn.Module, optimizer: Any) -> None:
    """Write the trained parameters and the optimizer state into checkpoint folder `folder`."""
    save_tensors(trainable_state(model), folder / TRAINABLE)
    save_state_dict(folder, OPTIMIZER, optimizer.state_dict())


def load_plain(folder: Path, model: nn.Module, optimizer: Any, scheduler: Any, process_index: int) -> Position:
    """Load an unsharded checkpoint into the model, optimizer, scheduler and this process's RNG; its Position.

    Every file is read and checked before anything is changed; the model's parameters are replaced only after.
    """
    with or_earlier(folder):
        trainable = read_tensors(folder / TRAINABLE, "the trained parameters")
        optim_state = load_state_dict(folder, OPTIMIZER, "the optimizer's state (AdamW moments and steps)")
        sched_state = load_scheduler(folder)
        rng = load_rng(folder, process_index)
        pos = read_position(folder)
    params = check_trainable(folder / TRAINABLE, trainable, model)  # another model: no "resume from earlier"
    with or_earlier(folder):
        check_optimizer(folder, optim_state, optimizer)
        check_scheduler(folder, sched_state, scheduler)
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    with or_earlier(folder):
        apply_state(folder / f"{OPTIMIZER}.json", optimizer.load_state_dict, optim_state)
        apply_state(folder / "scheduler.json", scheduler.load_state_dict, sched_state)
        apply_state(folder / "rng.json", set_rng_state, rng)
    return pos
