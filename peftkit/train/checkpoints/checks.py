"""Checks that a checkpoint fits the run resuming it, made before anything is changed, and what to do when not.

Each check raises a one-line PeftkitError naming the file and the mismatch; `or_earlier` adds the way out (resume
from the checkpoint before it, or start again).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.train.checkpoints.rundir import RunDir
from peftkit.train.checkpoints.state import load_state_dict, one_line

SAME_RUN = "resume with the same --model and method options as the original run"
SCHEDULER = "scheduler"  # scheduler.json: {"format": 1, "state": the LambdaLR state_dict()}; no tensors


def load_scheduler(folder: Path) -> Any:
    """The saved learning-rate schedule's state (not yet applied)."""
    return load_state_dict(folder, SCHEDULER, "the learning-rate schedule's position", with_tensors=False)


def refuse_old_format(folder: Path) -> None:
    """A checkpoint of peftkit's old format holds pickles; it is refused unopened (unpickling can run code)."""
    pickles = sorted(p.name for p in folder.glob("*.pt"))
    if pickles and not (folder / "optimizer.safetensors").exists():
        raise PeftkitError(f"checkpoint {folder} was written by an older peftkit as Python pickles ({', '.join(pickles)}),"
                           " which peftkit no longer reads because loading a pickle can run arbitrary code; start the "
                           "run again with --overwrite instead of --resume")


@contextmanager
def or_earlier(folder: Path) -> Iterator[None]:
    """Add what to do to a PeftkitError about a damaged checkpoint: resume from the one before it, or start again."""
    try:
        yield
    except PeftkitError as exc:
        earlier = RunDir.holding(folder).earlier_checkpoint(folder)
        again = "start the run again with --overwrite instead of --resume"
        fix = f"delete {folder} to resume from the earlier {earlier.name}, or {again}" if earlier else again
        raise PeftkitError(f"cannot resume: {exc}; {fix}") from None


def apply_state(file: Path, load: Callable[[Any], None], state: Any) -> None:
    """`load(state)` (a load_state_dict), its failure a PeftkitError naming `file`."""
    try:
        load(state)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise PeftkitError(f"{file} does not fit ({one_line(exc)})") from None


def check_trainable(file: Path, tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, nn.Parameter]:
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


def check_optimizer(folder: Path, state: Any, optimizer: Any) -> None:
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


def check_scheduler(folder: Path, state: Any, scheduler: Any) -> None:
    """The saved schedule has this scheduler's entries, with one value per parameter group where it has."""
    file = folder / f"{SCHEDULER}.json"
    expected = scheduler.state_dict()
    if not isinstance(state, dict) or set(state) != set(expected):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise PeftkitError(f"{file} holds {found} but the learning-rate scheduler's state has {sorted(expected)}")
    for key, value in expected.items():
        if isinstance(value, list) and (not isinstance(state[key], list) or len(state[key]) != len(value)):
            raise PeftkitError(f"{file}: {key!r} should be a list of {len(value)} (one per parameter group)")
