"""Checkpoints that let `--resume` continue a run exactly where it stopped.

A checkpoint is a folder `<run>/checkpoints/step-<N>/`, written atomically (a temporary folder renamed into place,
so a run killed mid-write leaves the previous checkpoint intact), holding:

    trainable.safetensors   every parameter with requires_grad, by its name in the model: the live training
                            state (e.g. LoRA's A and B as trained), not the folded PEFT export
    optimizer.pt            AdamW moments and step counts
    scheduler.pt            the learning-rate schedule's position
    rng.pt                  Python / NumPy / torch (and CUDA) RNG states of every process (dropout continues)
    trainer_state.json      step, data position (epoch, next micro-batch index), tokens seen

Only the main process writes; every process takes part in gathering the RNG states.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.io.adapters import atomic_dir

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"


@dataclass
class Position:
    """Where training is: optimizer steps done, current epoch, index of the next micro-batch in that epoch's plan."""

    step: int = 0
    epoch: int = 0
    micro: int = 0
    tokens: int = 0


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: tensor} of the parameters being trained (CPU copies)."""
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    """This process's RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore RNG states saved by `rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer: Any, scheduler: Any, pos: Position,
                    accelerator: Any, keep: int = 2) -> Path:
    """Write checkpoint `step-<pos.step>` (main process only) and prune all but the newest `keep`."""
    from accelerate.utils import gather_object

    rngs = gather_object([rng_state()])  # one entry per process, in rank order
    folder = Path(run_dir) / CHECKPOINTS / f"step-{pos.step:06d}"
    if accelerator.is_main_process:
        with atomic_dir(folder) as tmp:
            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rngs, tmp / "rng.pt")
            (tmp / STATE_NAME).write_text(json.dumps(asdict(pos), indent=2) + "\n")
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of an interrupted write are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE_NAME).is_file())


def load_checkpoint(folder: Path, model: nn.Module, optimizer: Any, scheduler: Any, process_index: int) -> Position:
    """Load a checkpoint into the (unwrapped) model, optimizer, scheduler and this process's RNG; its Position."""
    tensors = load_file(str(folder / "trainable.safetensors"))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != expected:
        missing = sorted(expected - set(tensors))[:3]
        raise PeftkitError(f"checkpoint {folder} does not match the model being trained (e.g. missing {missing}); "
                           "resume with the same --model and method options as the original run")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
    rngs = torch.load(folder / "rng.pt", weights_only=False)
    set_rng_state(rngs[process_index] if process_index < len(rngs) else rngs[0])
    return Position(**json.loads((folder / STATE_NAME).read_text()))
