"""Where training is, saved as a checkpoint's position file (trainer_state.json), the file a checkpoint writes last.

    {"step": optimizer steps done, "epoch": current epoch, "micro": next micro-batch of that epoch, "tokens": seen}

The run folder (`RunDir.position_file`) names the file, since its presence is what makes a checkpoint complete.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.train.checkpoints.rundir import RunDir
from peftkit.train.checkpoints.state import read_json


@dataclass
class Position:
    """Where training is: optimizer steps done, current epoch, index of the next micro-batch in that epoch's plan."""

    step: int = 0
    epoch: int = 0
    micro: int = 0
    tokens: int = 0


def write_position(folder: Path, pos: Position) -> None:
    """Write `pos` into checkpoint folder `folder` (last: it marks the checkpoint complete)."""
    RunDir.position_file(folder).write_text(json.dumps(asdict(pos), indent=2) + "\n")


def read_position(folder: Path) -> Position:
    """The Position saved in checkpoint folder `folder`; anything but four non-negative integers is an error."""
    file = RunDir.position_file(folder)
    state = read_json(file, "the training position")
    names = [f.name for f in fields(Position)]
    if sorted(state) != sorted(names) or not all(type(state[n]) is int and state[n] >= 0 for n in names):
        raise PeftkitError(f"{file} should hold the non-negative integers {', '.join(names)}, not {json.dumps(state)[:200]}")
    return Position(**state)
