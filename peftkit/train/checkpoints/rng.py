"""Every process's random number generators (Python, NumPy, torch CPU, CUDA) in a checkpoint's rng.* files.

    rng.safetensors   per process r: `r.torch` (torch CPU RNG, uint8), `r.numpy.key` (NumPy's MT19937 key, uint32),
                      `r.cuda.<device>` (uint8, when CUDA is present)
    rng.json          {"format": 1, "state": [one entry per process, in rank order]}: Python's random.getstate()
                      and the rest of np.random.get_state(), with the tensors above referenced by key
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftkit.errors import PeftkitError
from peftkit.train.checkpoints.state import load_state_dict, one_line, save_state_dict

STEM = "rng"


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


def save_rngs(folder: Path, states: list[dict[str, Any]]) -> None:
    """Write every process's `rng_state()` (in rank order) into checkpoint folder `folder`."""
    save_state_dict(folder, STEM, [_to_saved(s) for s in states])


def load_rng(folder: Path, process_index: int) -> dict[str, Any]:
    """This process's saved RNG state (a process the run did not have takes process 0's); not yet applied."""
    saved = load_state_dict(folder, STEM, "the processes' RNG states")
    file = folder / f"{STEM}.json"
    if not isinstance(saved, list) or not saved:
        raise PeftkitError(f"{file} should hold a list of RNG states, one per process")
    state = saved[process_index] if process_index < len(saved) else saved[0]
    try:
        numpy = state["numpy"]
        key = numpy["key"].numpy()
        return {**state, "numpy": (numpy["bit_generator"], key, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"])}
    except (KeyError, TypeError, AttributeError) as exc:
        raise PeftkitError(f"{file} is not a saved RNG state (no valid {one_line(exc)})") from None


def _to_saved(state: dict[str, Any]) -> dict[str, Any]:
    """`rng_state()` with NumPy's state as a dict holding its key as a tensor (everything else is JSON)."""
    name, key, pos, has_gauss, cached = state["numpy"]
    numpy = {"bit_generator": name, "key": torch.from_numpy(key.copy()), "pos": int(pos), "has_gauss": int(has_gauss),
             "cached_gaussian": float(cached)}
    return {**state, "numpy": numpy}
