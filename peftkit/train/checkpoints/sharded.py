"""The trained state of a sharded run (FSDP2) in a checkpoint: each process writes its own shard, nothing is gathered.

Under FSDP2 every trainable parameter and its AdamW moments are DTensors of which each process holds one slice.
Gathering them for a checkpoint would put the whole optimizer state of a full fine-tune (12 bytes a parameter)
into one process's memory, so instead process r writes its slices:

    shard-<r>-of-<n>.safetensors   the local slices, keyed by path: `model.<param name>`, `optimizer.state.<param
                                   name>.exp_avg`, ... (torch.distributed.checkpoint's sharded state dicts, whose
                                   optimizer state is keyed by parameter name, not index)
    shard-<r>-of-<n>.json          the JSON skeleton of the same (param_groups, hyper-parameters; state.py's format)

These replace trainable.safetensors and optimizer.* of an unsharded checkpoint (plain.py) (the scheduler, RNG and position
files are the same). Nothing is pickled: torch.distributed.checkpoint's own writer (which pickles a .metadata
file) is not used. The slices are cut by the number of processes, so a checkpoint resumes with the same number of
processes (checked). Every process must be able to see the run folder (a shared filesystem on several nodes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.train.checkpoints.checks import apply_state, check_scheduler, load_scheduler, or_earlier
from peftkit.train.checkpoints.position import Position, read_position
from peftkit.train.checkpoints.rng import load_rng, set_rng_state
from peftkit.train.checkpoints.state import load_state_dict, save_state_dict

SHARD = "shard-{rank:05d}-of-{world:05d}"


def is_sharded_model(model: nn.Module) -> bool:
    """True when the model's parameters are DTensors (FSDP2 has sharded it)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def has_shards(folder: Path) -> bool:
    """True for a checkpoint written by a sharded run."""
    return any(Path(folder).glob("shard-*-of-*.json"))


def _sharded_state(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    """{"model": ..., "optimizer": ...}: the trainable parameters and optimizer state as DTensors (not gathered)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=False, ignore_frozen_params=True)
    msd, osd = get_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=options)
    return {"model": msd, "optimizer": osd}


def _local(value: Any) -> Any:
    """`value` with every DTensor replaced by this process's slice."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.to_local()
    if isinstance(value, dict):
        return {k: _local(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_local(v) for v in value)
    return value


def save_shard(folder: Path, model: nn.Module, optimizer: Any, rank: int, world: int) -> None:
    """Write this process's slices into `folder` (every process calls it, each with its rank)."""
    save_state_dict(Path(folder), SHARD.format(rank=rank, world=world), _local(_sharded_state(model, optimizer)))


def load_shard(folder: Path, model: nn.Module, optimizer: Any, rank: int, world: int) -> None:
    """Load this process's slices into the sharded model and optimizer; the checkpoint must have `world` shards
    that fit (names and slice shapes), else a PeftkitError before anything changes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    folder = Path(folder)
    written = sorted(folder.glob("shard-*-of-*.json"))
    if len(written) != world or not (folder / f"{SHARD.format(rank=rank, world=world)}.json").is_file():
        raise PeftkitError(f"{folder} was written by {len(written)} sharded processes; resume with the same number "
                           f"of processes (this run has {world})")
    saved = load_state_dict(folder, SHARD.format(rank=rank, world=world), "this process's slice of the trained "
                            "parameters and optimizer state")
    template = _sharded_state(model, optimizer)
    state = _fill(template, saved, folder / f"{SHARD.format(rank=rank, world=world)}.safetensors", "")
    options = StateDictOptions(full_state_dict=False, strict=False)  # the frozen base is not in it (_fill checked)
    set_state_dict(model, getattr(optimizer, "optimizer", optimizer), model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"], options=options)


def _fill(template: Any, saved: Any, file: Path, path: str) -> Any:
    """`saved` rebuilt on `template`'s structure: each DTensor of the template gets the saved slice (same local
    shape), other values are the saved ones. A mismatch is a PeftkitError naming the entry."""
    from torch.distributed.tensor import DTensor

    if isinstance(template, dict):
        if not isinstance(saved, dict) or set(saved) != set(template):
            extra = sorted(set(saved) ^ set(template))[:3] if isinstance(saved, dict) else type(saved).__name__
            raise PeftkitError(f"{file} does not fit the run at {path or 'top level'!r} (differs in {extra}); resume "
                               "with the same --model, method options and number of processes")
        return {k: _fill(template[k], saved[k], file, f"{path}.{k}" if path else str(k)) for k in template}
    if isinstance(template, list | tuple) and isinstance(saved, list | tuple) and len(saved) == len(template):
        return type(template)(_fill(t, s, file, f"{path}.{i}") for i, (t, s) in enumerate(zip(template, saved, strict=True)))
    if isinstance(template, torch.Tensor):
        local = template.to_local() if isinstance(template, DTensor) else template
        if not isinstance(saved, torch.Tensor) or saved.shape != local.shape:
            got = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise PeftkitError(f"{file}: {path!r} holds {got} but this process's slice is {tuple(local.shape)}; resume "
                               "with the same number of processes and options")
        value = saved.to(local.device, local.dtype)
        if isinstance(template, DTensor):
            return DTensor.from_local(value, template.device_mesh, template.placements, run_check=False,
                                      shape=template.shape, stride=template.stride())
        return value
    return saved


def load_sharded(folder: Path, model: nn.Module, optimizer: Any, scheduler: Any, process_index: int) -> Position:
    """Load a sharded checkpoint: this process's slices, then the shared scheduler, RNG and position."""
    import torch.distributed as dist

    with or_earlier(folder):
        sched_state = load_scheduler(folder)
        rng = load_rng(folder, process_index)
        pos = read_position(folder)
        check_scheduler(folder, sched_state, scheduler)
        load_shard(folder, model, optimizer, process_index, dist.get_world_size())
        apply_state(folder / "scheduler.json", scheduler.load_state_dict, sched_state)
        apply_state(folder / "rng.json", set_rng_state, rng)
    return pos
