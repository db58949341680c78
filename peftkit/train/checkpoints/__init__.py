"""Checkpoints that let `--resume` continue a run exactly where it stopped, stored so that reading one runs no code.

A checkpoint is a folder `RUN/checkpoints/step-<N>/` (`RunDir.checkpoint(N)`, N zero-padded to 6 digits), written
atomically. It holds only safetensors and JSON files, never a pickle:

    trainable.safetensors, optimizer.safetensors, optimizer.json   the trained state (plain.py); under FSDP each
                            process's slices instead, shard-<r>-of-<n>.safetensors + .json (sharded.py)
    scheduler.json          {"format": 1, "state": the LambdaLR state_dict()}: last_epoch, base_lrs, _last_lr, ...
                            (its `lr_lambdas` are plain functions, stored as null and rebuilt by the trainer)
    rng.safetensors, rng.json   every process's RNG states (rng.py)
    objective.safetensors, objective.json   every process's objective state (objective.py: GRPO's sampler
                            generator and reused rollouts), when the objective has one
    trainer_state.json      {"step", "epoch", "micro", "tokens"}: the Position (position.py), written last

The modules, by idea: folder.py (save_checkpoint / load_checkpoint of one folder), plain.py and sharded.py (the
trained state, whole or per process), rng.py, objective.py, position.py, checks.py (does a checkpoint fit the run
resuming it), state.py (nested state dicts as safetensors + a JSON skeleton: {"__tuple__": [...]} for a tuple,
{"__items__": [[key, value], ...]} for a dict with non-string keys, {"__tensor__": key} for a tensor).

Loading reads and checks every file before changing anything: a missing file, one that is not valid safetensors /
JSON, or tensors whose names or shapes do not fit the model and optimizer is a one-line PeftkitError naming the file
and what to do. A checkpoint of the old pickle format (optimizer.pt, scheduler.pt, rng.pt) is refused unopened.
"""

from peftkit.train.checkpoints.folder import load_checkpoint, save_checkpoint
from peftkit.train.checkpoints.position import Position

__all__ = ["Position", "load_checkpoint", "save_checkpoint"]
