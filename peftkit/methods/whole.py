"""The two methods that train the model's own weights and inject nothing: `full` (every weight trainable) and
`freeze` (only the last N decoder layers trainable).

They are registered like every other method (`trains_base = True`), so the trainer, the estimator and the counts
set them up through the registry. Their result is a whole model folder (`peftkit.io.models.save_model_folder`),
which `from_pretrained` loads and `peftkit compress` can diff against the base to turn the delta into a LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from peftkit.core.archs import decoder_layers
from peftkit.core.method import Method, check_positive
from peftkit.core.registry import register
from peftkit.core.shapes import BaseTraining, ModelShape
from peftkit.errors import PeftkitError


@dataclass(frozen=True)
class FullConfig:
    """A full fine-tune has no options: every parameter trains."""


@dataclass(frozen=True)
class FreezeConfig:
    """Freeze fine-tune: only the last `layers` decoder layers train (`--set layers=N`)."""

    layers: int = 2

    def __post_init__(self) -> None:
        check_positive("layers", self.layers)


class _WholeModelMethod(Method):
    """A method that trains base weights: every parameter frozen, then the modules `trained_modules` names unfrozen."""

    trains_base = True

    def trained_modules(self, model: nn.Module, config: Any) -> list[nn.Module]:
        raise NotImplementedError

    def make_trainable(self, model: nn.Module, config: Any) -> None:
        model.requires_grad_(False)
        for module in self.trained_modules(model, config):
            module.requires_grad_(True)


class FullMethod(_WholeModelMethod):
    """Registry entry for full fine-tuning (`--method full`): every parameter trains."""

    name, config_cls, default_lr = "full", FullConfig, 2e-5

    def trained_modules(self, model: nn.Module, config: FullConfig) -> list[nn.Module]:
        return [model]

    def trained_base(self, config: FullConfig, shape: ModelShape) -> BaseTraining:
        """Every decoder layer, and the embeddings, final norm and head (the estimator's `whole`)."""
        return BaseTraining(layers=shape.layers, whole=True)


class FreezeMethod(_WholeModelMethod):
    """Registry entry for freeze fine-tuning (`--method freeze --set layers=2`): the last N decoder layers train."""

    name, config_cls, default_lr = "freeze", FreezeConfig, 5e-5

    def trained_modules(self, model: nn.Module, config: FreezeConfig) -> list[nn.Module]:
        stack = decoder_layers(model)
        if config.layers > len(stack):
            raise PeftkitError(f"freeze: layers must be between 1 and {len(stack)} (the model's decoder layers), "
                               f"got {config.layers}")
        return list(stack)[-config.layers:]

    def trained_base(self, config: FreezeConfig, shape: ModelShape) -> BaseTraining:
        """The top `layers` decoder layers only (the layers below them save no activations)."""
        return BaseTraining(layers=config.layers)


register(FullMethod())
register(FreezeMethod())
