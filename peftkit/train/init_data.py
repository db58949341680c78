"""What a method's data-driven init reads (`Method.initialise`, `core.method.InitData`): the run's training
micro-batches and the base model's stored weights. The trainer calls `initialise_adapters` once per run, after
injection, with the model on its device and before the optimizer is built (an init may replace parameters)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import cache
from typing import TYPE_CHECKING

import torch

from peftkit.core.method import InitData
from peftkit.core.state import adapters
from peftkit.errors import PeftkitError
from peftkit.io.shards import Checkpoint, open_checkpoint, read_tensor, resolve_base

if TYPE_CHECKING:
    from peftkit.train.objectives.base import ObjectiveRun
    from peftkit.train.run import Session


def initialise_adapters(s: Session, objective: ObjectiveRun) -> None:
    """Give every adapter of the run's model to its method's `initialise` with this run's data."""
    data = InitData(batches=lambda: _batches(s, objective), weight=stored_weights(s.cfg.model))
    for name, record in list(adapters(s.model).items()):
        s.method.initialise(s.model, record.config, name, data)


def _batches(s: Session, objective: ObjectiveRun) -> Iterator[dict[str, torch.Tensor]]:
    """The first epoch's micro-batches in training order, again and again (the objective collates them)."""
    micro = s.plan(0)
    while True:
        for indices in micro:
            yield from objective.step_batches(s.model, [indices])


def stored_weights(model_name: str | None) -> Callable[[str], torch.Tensor]:
    """weight(path) -> the stored `<path>.weight` of the run's base model (its safetensors folder, opened once)."""

    @cache
    def checkpoint() -> Checkpoint:
        if model_name is not None and model_name.endswith(".gguf"):
            raise PeftkitError("this init reads the base's full-precision weights from safetensors files; a .gguf "
                               "base has none: convert it to a model folder first")
        return open_checkpoint(resolve_base(model_name))

    def weight(path: str) -> torch.Tensor:
        key = f"{path}.weight"
        if key not in checkpoint().key_to_shard:
            raise PeftkitError(f"the base model's files have no tensor {key!r}; this init needs the stored weight of "
                               f"every adapted module")
        return read_tensor(checkpoint(), key)

    return weight
