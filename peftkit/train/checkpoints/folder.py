"""One checkpoint folder: `save_checkpoint` writes it (and prunes old ones), `load_checkpoint` resumes from it.

The folder is written atomically (io.fs.atomic_dir: a temporary folder renamed into place), its position file last,
so a run killed mid-write leaves the previous checkpoints intact and no folder that looks complete but is not.
Only the main process writes; every process takes part in gathering the RNG states and the objective's state
(objective.py), and under FSDP every process writes its own slices into the main process's temporary folder
(sharded.py).
"""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from torch import nn

from peftkit.errors import PeftkitError
from peftkit.io.fs import atomic_dir
from peftkit.train.checkpoints.checks import SCHEDULER, apply_state, or_earlier, refuse_old_format
from peftkit.train.checkpoints.objective import load_objective, objective_state, save_objective
from peftkit.train.checkpoints.plain import load_plain, save_plain
from peftkit.train.checkpoints.position import Position, write_position
from peftkit.train.checkpoints.rng import rng_state, save_rngs
from peftkit.train.checkpoints.rundir import RunDir
from peftkit.train.checkpoints.sharded import has_shards, is_sharded_model, load_sharded, save_shard
from peftkit.train.checkpoints.state import save_state_dict


def save_checkpoint(run_dir: RunDir, model: nn.Module, optimizer: Any, scheduler: Any, pos: Position,
                    accelerator: Any, keep: int = 2, objective: Any = None) -> Path:
    """Write the checkpoint of step `pos.step` into `run_dir` (the main process; under FSDP every process adds its
    shard of the trained state) and prune all but the newest `keep` that peftkit wrote; the checkpoint's folder.
    `objective`: the run's ObjectiveRun, whose `state_dict()` is saved too."""
    from accelerate.utils import broadcast_object_list, gather_object

    gathered = gather_object([(rng_state(), objective_state(objective))])  # one entry per process, in rank order
    rngs, objectives = [rng for rng, _ in gathered], [state for _, state in gathered]
    folder = run_dir.checkpoint(pos.step)
    main, sharded = accelerator.is_main_process, is_sharded_model(model)
    with atomic_dir(folder, command="train") if main else nullcontext() as tmp:
        if sharded:  # every process writes its slices into the main process's temporary folder
            where = Path(broadcast_object_list([str(tmp) if main else None])[0])
            save_shard(where, model, optimizer, accelerator.process_index, accelerator.num_processes)
            accelerator.wait_for_everyone()
        if main:
            assert tmp is not None  # atomic_dir's temporary folder (the main process's context)
            if not sharded:
                save_plain(tmp, model, optimizer)
            save_state_dict(tmp, SCHEDULER, scheduler.state_dict(), with_tensors=False)
            save_rngs(tmp, rngs)
            save_objective(tmp, objectives)
            write_position(tmp, pos)  # last: the mark of a complete checkpoint
    if main:
        for old in run_dir.prunable(keep):
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def load_checkpoint(folder: Path, model: nn.Module, optimizer: Any, scheduler: Any, process_index: int,
                    objective: Any = None) -> Position:
    """Load a checkpoint into the (unwrapped) model, optimizer, scheduler, this process's RNG and `objective` (the
    run's ObjectiveRun: `load_state_dict`); its Position.

    Every file is read and checked before anything is changed; any problem is a one-line PeftkitError naming the
    file and what to do (resume from the checkpoint before it, or start again).
    """
    folder = Path(folder)
    refuse_old_format(folder)
    if is_sharded_model(model) != has_shards(folder):
        raise PeftkitError(f"{folder} was written by a{' sharded' if has_shards(folder) else 'n unsharded'} run; "
                           "resume with the same sharding option (--fsdp / --deepspeed) as the original run")
    with or_earlier(folder):
        state = load_objective(folder, process_index)
    if has_shards(folder):
        pos = load_sharded(folder, model, optimizer, scheduler, process_index)
    else:
        pos = load_plain(folder, model, optimizer, scheduler, process_index)
    if objective is not None:
        with or_earlier(folder):
            apply_state(folder / "objective.json", objective.load_state_dict, state)
    return pos
