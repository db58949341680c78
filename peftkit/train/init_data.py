"""What a method's data-driven init reads (`Method.initialise`, `core.method.InitData`): the run's training
micro-batches and the base model's stored weights. The trainer calls `initialise_adapters` once per run, after
injection, with the model on its device and before the optimizer is built (an init may replace parameters)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import cache
from typing import TYPE_CHECKING

import torch
from torch import nn

from peftkit.core.method import InitData
from peftkit.core.state import adapters
from peftkit.errors import PeftkitError
from peftkit.io.shards import Checkpoint, open_checkpoint, read_tensor, resolve_base

if TYPE_CHECKING:
    from peftkit.core.method import Method
    from peftkit.train.objectives.base import ObjectiveRun


def initialise_adapters(model: nn.Module, method: Method, model_name: str | None, micro: list[list[int]],
                        objective: ObjectiveRun) -> None:
    """Give every adapter of `model` to its method's `initialise` with this run's data: the micro-batches `micro`
    (the first epoch's, in training order), collated by the objective, and the stored weights of `model_name`."""
    data = InitData(batches=lambda: _batches(model, micro, objective), weight=stored_weights(model_name))
    for name, record in list(adapters(model).items()):
        method.initialise(model, record.config, name, data)


def _batches(model: nn.Module, micro: list[list[int]], objective: ObjectiveRun) -> Iterator[dict[str, torch.Tensor]]:
    """The micro-batches again and again."""
    while True:
        for indices in micro:
            yield from objective.step_batches(model, [indices])


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
