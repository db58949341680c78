"""The two methods that train the model's own weights and inject nothing: `full` (every weight trainable) and
`freeze` (only the last N decoder layers trainable).

They are registered like every other method (`trains_base = True`), so the trainer, the estimator and the counts
set them up through the registry. Their result is a whole model folder (`peftkit.io.models.save_model_folder`),
which `from_pretrained` loads and `peftkit compress` can diff against the base to turn the delta into a LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from peftkit.core.archs import decoder_layers
from peftkit.core.method import Method, check_positive
from peftkit.core.registry import register
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


class FullMethod(Method):
    """Registry entry for full fine-tuning (`--method full`)."""

    name = "full"
    config_cls = FullConfig
    trains_base = True
    default_lr = 2e-5

    def make_trainable(self, model: nn.Module, config: FullConfig) -> None:
        """Every parameter trains."""
        model.requires_grad_(True)


class FreezeMethod(Method):
    """Registry entry for freeze fine-tuning (`--method freeze --set layers=2`)."""

    name = "freeze"
    config_cls = FreezeConfig
    trains_base = True
    default_lr = 5e-5

    def make_trainable(self, model: nn.Module, config: FreezeConfig) -> None:
        """Only the last `config.layers` decoder layers train."""
        stack = decoder_layers(model)
        if config.layers > len(stack):
            raise PeftkitError(f"freeze: layers must be between 1 and {len(stack)} (the model's decoder layers), "
                               f"got {config.layers}")
        model.requires_grad_(False)
        for layer in list(stack)[-config.layers:]:
            layer.requires_grad_(True)


register(FullMethod())
register(FreezeMethod())
