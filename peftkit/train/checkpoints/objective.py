"""The objective's own state in a checkpoint (`ObjectiveRun.state_dict`): what `--resume` needs beyond the model,
optimizer, schedule and RNGs to continue exactly (GRPO: its sampler's generator, the rollouts it reuses).

    objective.safetensors, objective.json   {"format": 1, "state": [one entry per process, in rank order]}
                                            (state.py's format); written only when some process has state

Every process's state is gathered to the main process (on the CPU first, so no rank's device travels with it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.train.checkpoints.state import load_state_dict, save_state_dict

STEM = "objective"


def objective_state(objective: Any) -> dict[str, Any]:
    """This process's `objective.state_dict()` with its tensors on the CPU ({} with no objective)."""
    from accelerate.utils import send_to_device

    return send_to_device(objective.state_dict(), "cpu") if objective is not None else {}


def save_objective(folder: Path, states: list[dict[str, Any]]) -> None:
    """Write every process's objective state (in rank order) into checkpoint folder `folder`, when any has one."""
    if any(states):
        save_state_dict(folder, STEM, states)


def load_objective(folder: Path, process_index: int) -> dict[str, Any]:
    """This process's saved objective state ({} when the checkpoint holds none); not yet applied."""
    if not (folder / f"{STEM}.json").exists():
        return {}
    saved = load_state_dict(folder, STEM, "the objective's state, one entry per process")
    file = folder / f"{STEM}.json"
    if not isinstance(saved, list) or not all(isinstance(s, dict) for s in saved):
        raise PeftkitError(f"{file} should hold a list of objective states, one per process")
    if process_index >= len(saved):
        raise PeftkitError(f"{file} was written by {len(saved)} processes; resume with as many (this is process "
                           f"{process_index})")
    return saved[process_index]
