"""The training loop: one function, read top to bottom.

Each optimizer step takes the next `grad_accum * world_size` micro-batches of the data plan (crossing into the
next epoch when one ends, so every process always gets its share); process r takes every world_size-th one.
The objective (train/objectives/: an `ObjectiveRun`) turns this process's share of those indices into the step's
micro-batches (`step_batches`: collating, or for an online objective sampling from the model first), gives each
micro-batch's summed loss (`loss`) and what it is normalised by (`count`: target tokens for SFT, pairs, examples).
The loss is normalised by that count over the *whole step* (all micro-batches, all processes), for SFT:

    loss_i = sum_of_token_losses(micro-batch i) * world_size / targets_in_step

DDP averages gradients over the world_size processes, so the update is the gradient of
sum(all token losses) / targets_in_step: the same as one process running all the micro-batches, and independent
of how tokens fall into micro-batches (a per-micro-batch mean would over-weight the tokens of short micro-batches).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.train.checkpoints import Position, save_checkpoint
from peftkit.train.checkpoints.rundir import RunDir
from peftkit.train.objectives.base import ObjectiveRun
from peftkit.train.objectives.sft import SftRun


@dataclass
class Loop:
    """What the loop needs; built by `peftkit.train.run`.

    plan(epoch) -> the epoch's micro-batches (lists of example indices), identical on every process.
    objective: the run's ObjectiveRun (step_batches, loss, count); None: SFT over `collate(indices)` -> a model
    batch on the right device. lengths[i] = tokens of example i (for tokens/s).
    """

    model: nn.Module                      # prepared by accelerate (maybe DDP-wrapped)
    optimizer: Any
    scheduler: Any
    accelerator: Any
    plan: Callable[[int], list[list[int]]]
    collate: Callable[[list[int]], dict[str, torch.Tensor]] | None
    lengths: list[int]
    total_steps: int
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    save_steps: int | None = None
    eval_steps: int | None = None
    keep_checkpoints: int = 2
    run_dir: RunDir | None = None
    loss_path: str = "fused"                # loss.loss_path(model): fused | keep | full
    on_log: Callable[[dict], None] = lambda record: None
    on_eval: Callable[[int], object] = lambda step: None  # what it returns is not used
    on_checkpoint: Callable[[int], None] = field(default=lambda step: None)
    objective: ObjectiveRun | None = None


def micro_batches(loop: Loop, pos: Position) -> Iterator[tuple[list[int], int, int]]:
    """(indices, epoch, next micro index) from `pos` onwards, across epochs, forever."""
    epoch, micro = pos.epoch, pos.micro
    while True:
        plan = loop.plan(epoch)
        if not plan:
            raise PeftkitError("the data plan is empty: no example fits into a batch")
        while micro < len(plan):
            micro += 1
            yield plan[micro - 1], epoch, micro
        epoch, micro = epoch + 1, 0


def fit(loop: Loop, pos: Position) -> Position:
    """Train from `pos` until `loop.total_steps` optimizer steps are done; returns the final Position."""
    acc, model = loop.accelerator, loop.model
    world, rank = acc.num_processes, acc.process_index
    params = [p for p in model.parameters() if p.requires_grad]
    stream = micro_batches(loop, pos)
    objective = loop.objective
    if objective is None:  # a Loop built without one (tests build such Loops): SFT over `collate`
        assert loop.collate is not None, "a Loop needs an objective or a collate function"
        objective = SftRun(loop.collate)
    model.train()
    started = time.perf_counter()
    while pos.step < loop.total_steps:
        # 1. This step's micro-batches: grad_accum * world of them; ours are every world-th.
        group = [next(stream) for _ in range(loop.grad_accum * world)]
        pos.epoch, pos.micro = group[-1][1], group[-1][2]
        mine = objective.step_batches(model, [indices for indices, _, _ in group[rank::world]])
        counts = torch.tensor([sum(objective.count(b) for b in mine),
                               sum(loop.lengths[i] for idx, _, _ in group[rank::world] for i in idx)],
                              dtype=torch.float64, device=acc.device)
        n_targets, n_tokens = acc.reduce(counts, reduction="sum").tolist()  # whole step, all processes
        # 2. Forward / backward each micro-batch; gradients sync only on the last one.
        loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
        for i, batch in enumerate(mine):
            sync = nullcontext() if i == len(mine) - 1 else acc.no_sync(model)
            with sync, acc.autocast():
                token_losses = objective.loss(model, batch, loop.loss_path)  # sum over this micro-batch
                acc.backward(token_losses * world / max(n_targets, 1.0))
            loss_sum += token_losses.detach().double()
        loss = (acc.reduce(loss_sum, reduction="sum") / max(n_targets, 1.0)).item()
        if not math.isfinite(loss):
            _stop_on_nan(loop, pos.step + 1, loss)
        # 3. Clip, step, schedule.
        grad_norm = acc.clip_grad_norm_(params, loop.max_grad_norm) if loop.max_grad_norm else None
        loop.optimizer.step()
        loop.scheduler.step()
        loop.optimizer.zero_grad(set_to_none=True)
        pos.step += 1
        pos.tokens += int(n_tokens)
        elapsed = time.perf_counter() - started
        loop.on_log({"step": pos.step, "epoch": pos.epoch, "loss": loss, "lr": loop.scheduler.get_last_lr()[0],
                     "grad_norm": None if grad_norm is None else float(grad_norm), "tokens": pos.tokens,
                     "step_tokens": int(n_tokens), "elapsed_s": elapsed})
        # 4. Evaluate / checkpoint on schedule (the final checkpoint is the saved result, not a step folder).
        if loop.eval_steps and pos.step % loop.eval_steps == 0 and pos.step < loop.total_steps:
            loop.on_eval(pos.step)
            model.train()
        if loop.save_steps and loop.run_dir and pos.step % loop.save_steps == 0 and pos.step < loop.total_steps:
            save_checkpoint(loop.run_dir, acc.unwrap_model(model), loop.optimizer, loop.scheduler, pos, acc,
                            loop.keep_checkpoints, objective)
            loop.on_checkpoint(pos.step)
    return pos


def _stop_on_nan(loop: Loop, step: int, loss: float) -> None:
    """Stop with a message naming the last good checkpoint (the weights are left as they were before this step)."""
    newest = loop.run_dir.latest_checkpoint() if loop.run_dir else None
    where = f"the last good checkpoint is {newest} (continue with --resume after lowering --lr)" if newest \
        else "no checkpoint was saved yet (use --save-steps)"
    raise PeftkitError(f"the loss became {loss} at step {step}; training stopped, {where}. "
                       "A lower --lr, --precision fp32 or a larger --warmup usually avoids this")
