"""Checkpoints that let `--resume` continue a run exactly where it stopped, stored so that reading one runs no code.

A checkpoint is a folder `<run>/checkpoints/step-<N>/` (N zero-padded to 6 digits), written atomically (a temporary
folder renamed into place, so a run killed mid-write leaves the previous checkpoint intact). It holds only
safetensors and JSON files, never a pickle:

    trainable.safetensors   every parameter with requires_grad, by its name in the model: the live training
                            state (e.g. LoRA's A and B as trained), not the folded PEFT export
    optimizer.safetensors   every tensor of the optimizer's state_dict()["state"], keyed `state.<param index>.<name>`
                            (AdamW: `exp_avg`, `exp_avg_sq`, and `step`, a 0-d float32 tensor)
    optimizer.json          {"format": 1, "state": skeleton of the optimizer's state_dict()}: `param_groups` with
                            every per-group option (lr, betas, eps, weight_decay, initial_lr, params, ...) and the
                            non-tensor state entries; each tensor is {"__tensor__": "<key in optimizer.safetensors>"}
    scheduler.json          {"format": 1, "state": the LambdaLR state_dict()}: last_epoch, base_lrs, _last_lr, ...
                            (its `lr_lambdas` are plain functions, stored as null and rebuilt by the trainer)
    rng.safetensors         per process r: `r.torch` (torch CPU RNG, uint8), `r.numpy.key` (NumPy's MT19937 key,
                            uint32), `r.cuda.<device>` (uint8, when CUDA is present)
    rng.json                {"format": 1, "state": [one entry per process, in rank order]}: Python's
                            random.getstate() and the rest of np.random.get_state() (bit_generator, pos, has_gauss,
                            cached_gaussian), with the tensors above referenced by key
    trainer_state.json      {"step", "epoch", "micro" (next micro-batch of that epoch), "tokens"}: a Position

The JSON skeletons (peftkit/train/state_io.py) mark what JSON has no type for: {"__tuple__": [...]} for a tuple
(AdamW's betas, Python's RNG state) and {"__items__": [[key, value], ...]} for a dict with non-string keys (the
optimizer's int parameter indices), so loading restores the state dicts exactly.

Loading reads and checks every file before changing anything: a missing file, one that is not valid
safetensors / JSON, or tensors whose names or shapes do not fit the model and optimizer is a one-line PeftkitError
naming the file and what to do. A checkpoint of the old pickle format (optimizer.pt, scheduler.pt, rng.pt) is
refused without being opened. Only the main process writes; every process takes part in gathering the RNG states.
Under FSDP the trained parameters and optimizer state stay sharded: each process writes its slices as
`shard-<r>-of-<n>.safetensors` + `.json` in place of trainable.safetensors and optimizer.* (sharded_checkpoint.py).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.io.fs import atomic_dir
from peftkit.train.sharded_checkpoint import has_shards, is_sharded_model, load_shard, save_shard
from peftkit.train.state_io import load_state_dict, one_line, read_json, read_tensors, save_state_dict

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"
TRAINABLE = "trainable.safetensors"
SAME_RUN = "resume with the same --model and method options as the original run"


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
    """Write checkpoint `step-<pos.step>` (the main process; under FSDP every process adds its shard of the trained
    state, see sharded_checkpoint.py) and prune all but the newest `keep`."""
    from accelerate.utils import broadcast_object_list, gather_object

    rngs = gather_object([rng_state()])  # one entry per process, in rank order
    folder = Path(run_dir) / CHECKPOINTS / f"step-{pos.step:06d}"
    main, sharded = accelerator.is_main_process, is_sharded_model(model)
    with atomic_dir(folder, command="train") if main else nullcontext() as tmp:
        if sharded:  # every process writes its slices into the main process's temporary folder
            where = Path(broadcast_object_list([str(tmp) if main else None])[0])
            save_shard(where, model, optimizer, accelerator.process_index, accelerator.num_processes)
            accelerator.wait_for_everyone()
        if main:
            if not sharded:
                save_file(trainable_state(model), str(tmp / TRAINABLE))
                save_state_dict(tmp, "optimizer", optimizer.state_dict())
            save_state_dict(tmp, "scheduler", scheduler.state_dict(), with_tensors=False)
            save_state_dict(tmp, "rng", [_rng_to_saved(r) for r in rngs])
            (tmp / STATE_NAME).write_text(json.dumps(asdict(pos), indent=2) + "\n")
    if main:
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
    """Load a checkpoint into the (unwrapped) model, optimizer, scheduler and this process's RNG; its Position.

    Every file is read and checked before anything is changed; any problem is a PeftkitError (see the docstring).
    """
    folder = Path(folder)
    _refuse_old_format(folder)
    if is_sharded_model(model) != has_shards(folder):
        raise PeftkitError(f"{folder} was written by a{' sharded' if has_shards(folder) else 'n unsharded'} run; "
                           "resume with the same sharding option (--fsdp / --deepspeed) as the original run")
    if has_shards(folder):
        return _load_sharded(folder, model, optimizer, scheduler, process_index)
    with _or_earlier(folder):
        trainable = read_tensors(folder / TRAINABLE, "the trained parameters")
        optim_state = load_state_dict(folder, "optimizer", "the optimizer's state (AdamW moments and steps)")
        sched_state = load_state_dict(folder, "scheduler", "the learning-rate schedule's position", with_tensors=False)
        rng = _rng_from_saved(folder / "rng.json", load_state_dict(folder, "rng", "the processes' RNG states"),
                              process_index)
        pos = _position(folder / STATE_NAME)
    params = _check_trainable(folder / TRAINABLE, trainable, model)
    with _or_earlier(folder):
        _check_optimizer(folder, optim_state, optimizer)
        _check_scheduler(folder / "scheduler.json", sched_state, scheduler)
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    with _or_earlier(folder):
        _apply(folder / "optimizer.json", optimizer.load_state_dict, optim_state)
        _apply(folder / "scheduler.json", scheduler.load_state_dict, sched_state)
        _apply(folder / "rng.json", set_rng_state, rng)
    return pos


def _load_sharded(folder: Path, model: nn.Module, optimizer: Any, scheduler: Any, process_index: int) -> Position:
    """`load_checkpoint` of a sharded run: this process's slices, then the shared scheduler, RNG and position."""
    import torch.distributed as dist

    with _or_earlier(folder):
        sched_state = load_state_dict(folder, "scheduler", "the learning-rate schedule's position", with_tensors=False)
        rng = _rng_from_saved(folder / "rng.json", load_state_dict(folder, "rng", "the processes' RNG states"),
                              process_index)
        pos = _position(folder / STATE_NAME)
        _check_scheduler(folder / "scheduler.json", sched_state, scheduler)
        load_shard(folder, model, optimizer, process_index, dist.get_world_size())
        _apply(folder / "scheduler.json", scheduler.load_state_dict, sched_state)
        _apply(folder / "rng.json", set_rng_state, rng)
    return pos


def _refuse_old_format(folder: Path) -> None:
    """A checkpoint of peftkit's old format holds pickles; it is refused unopened (unpickling can run code)."""
    pickles = sorted(p.name for p in folder.glob("*.pt"))
    if pickles and not (folder / "optimizer.safetensors").exists():
        raise PeftkitError(f"checkpoint {folder} was written by an older peftkit as Python pickles ({', '.join(pickles)}),"
                           " which peftkit no longer reads because loading a pickle can run arbitrary code; start the "
                           "run again with --overwrite instead of --resume")


@contextmanager
def _or_earlier(folder: Path) -> Iterator[None]:
    """Add what to do to a PeftkitError about a damaged checkpoint: resume from the one before it, or start again."""
    try:
        yield
    except PeftkitError as exc:
        earlier = [p for p in list_checkpoints(folder.parent.parent) if p.name < folder.name]
        again = "start the run again with --overwrite instead of --resume"
        fix = f"delete {folder} to resume from the earlier {earlier[-1].name}, or {again}" if earlier else again
        raise PeftkitError(f"cannot resume: {exc}; {fix}") from None


def _apply(file: Path, load: Callable[[Any], None], state: Any) -> None:
    try:
        load(state)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise PeftkitError(f"{file} does not fit ({one_line(exc)})") from None


def _position(file: Path) -> Position:
    state = read_json(file, "the training position")
    names = [f.name for f in fields(Position)]
    if sorted(state) != sorted(names) or not all(type(state[n]) is int and state[n] >= 0 for n in names):
        raise PeftkitError(f"{file} should hold the non-negative integers {', '.join(names)}, not {json.dumps(state)[:200]}")
    return Position(**state)


def _rng_to_saved(state: dict[str, Any]) -> dict[str, Any]:
    """`rng_state()` with NumPy's state as a dict holding its key as a tensor (everything else is JSON)."""
    name, key, pos, has_gauss, cached = state["numpy"]
    numpy = {"bit_generator": name, "key": torch.from_numpy(key.copy()), "pos": int(pos), "has_gauss": int(has_gauss),
             "cached_gaussian": float(cached)}
    return {**state, "numpy": numpy}


def _rng_from_saved(file: Path, saved: Any, process_index: int) -> dict[str, Any]:
    """This process's `rng_state()` from the saved list (a process the run did not have takes process 0's)."""
    if not isinstance(saved, list) or not saved:
        raise PeftkitError(f"{file} should hold a list of RNG states, one per process")
    state = saved[process_index] if process_index < len(saved) else saved[0]
    try:
        numpy = state["numpy"]
        key = numpy["key"].numpy()
        return {**state, "numpy": (numpy["bit_generator"], key, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"])}
    except (KeyError, TypeError, AttributeError) as exc:
        raise PeftkitError(f"{file} is not a saved RNG state (no valid {one_line(exc)})") from None


def _check_trainable(file: Path, tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's trainable parameters by name, once the checkpoint's tensors are found to fit them."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        missing, extra = sorted(set(params) - set(tensors))[:3], sorted(set(tensors) - set(params))[:3]
        raise PeftkitError(f"{file} does not match the model being trained (missing {missing}, unexpected {extra}); "
                           f"{SAME_RUN}")
    for name, p in params.items():
        if tensors[name].shape != p.shape:
            raise PeftkitError(f"{file}: {name!r} has shape {tuple(tensors[name].shape)} but the model needs "
                               f"{tuple(p.shape)}; {SAME_RUN}")
    return params


def _check_optimizer(folder: Path, state: Any, optimizer: Any) -> None:
    """The saved optimizer state fits this optimizer: its groups, parameter indices and moment shapes."""
    file = folder / "optimizer.json"
    if not (isinstance(state, dict) and isinstance(state.get("state"), dict)
            and isinstance(state.get("param_groups"), list) and all(isinstance(g, dict) for g in state["param_groups"])):
        raise PeftkitError(f"{file} is not an optimizer state (a 'state' dict and a 'param_groups' list of dicts)")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    saved = [g.get("params") for g in state["param_groups"]]
    if [len(s) if isinstance(s, list) else None for s in saved] != sizes \
            or [i for s in saved for i in s] != list(range(len(params))):
        raise PeftkitError(f"{file} has parameter groups {saved} but the optimizer has groups of {sizes} parameters")
    for index, entry in state["state"].items():
        if type(index) is not int or not 0 <= index < len(params) or not isinstance(entry, dict):
            raise PeftkitError(f"{file} holds state for parameter {index!r}; the optimizer has 0..{len(params) - 1}")
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[index].shape:
                raise PeftkitError(f"{folder / 'optimizer.safetensors'}: 'state.{index}.{name}' has shape "
                                   f"{tuple(value.shape)} but parameter {index} has shape {tuple(params[index].shape)}")


def _check_scheduler(file: Path, state: Any, scheduler: Any) -> None:
    """The saved schedule has this scheduler's entries, with one value per parameter group where it has."""
    expected = scheduler.state_dict()
    if not isinstance(state, dict) or set(state) != set(expected):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise PeftkitError(f"{file} holds {found} but the learning-rate scheduler's state has {sorted(expected)}")
    for key, value in expected.items():
        if isinstance(value, list) and (not isinstance(state[key], list) or len(state[key]) != len(value)):
            raise PeftkitError(f"{file}: {key!r} should be a list of {len(value)} (one per parameter group)")
