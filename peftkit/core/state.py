"""Per-model adapter bookkeeping, kept on the HF model itself (no wrapper class).

`model.peftkit_adapters` maps adapter name -> AdapterRecord(method, config); `model.peftkit_active` is the active
adapter's name. The adapter weights themselves live in `AdapterLayer` submodules of the model, so the optimizer,
accelerate and DDP see them as ordinary parameters.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from peftkit.errors import PeftkitError
from peftkit.core.method import AdapterLayer


@dataclass
class AdapterRecord:
    """What peftkit knows about one injected adapter: its registered method name and its config."""

    method: str
    config: Any


def adapters(model: nn.Module) -> dict[str, AdapterRecord]:
    """The adapters injected into `model`, by name (an empty dict for a plain model)."""
    if "peftkit_adapters" not in model.__dict__:
        model.__dict__["peftkit_adapters"] = {}
    return model.__dict__["peftkit_adapters"]


def active_adapter(model: nn.Module) -> str | None:
    """Name of the active adapter, or None."""
    return model.__dict__.get("peftkit_active")


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """Every AdapterLayer in the model with its dotted path."""
    for path, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield path, module


def resolve_name(model: nn.Module, name: str | None) -> str:
    """`name` if given and present, else the active adapter; a clear error when there is none."""
    known = adapters(model)
    if name is None:
        name = active_adapter(model)
        if name is None:
            raise PeftkitError("the model has no adapter; inject or load one first")
    if name not in known:
        raise PeftkitError(f"no adapter named {name!r}; the model has {sorted(known) or 'none'}")
    return name


def activate(model: nn.Module, name: str | None) -> None:
    """Make `name` the active adapter everywhere (None disables all) and make only its parameters trainable.

    Base parameters stay frozen; the parameters of other adapters are frozen too, so an optimizer built after
    this call trains exactly the active adapter.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    for _, layer in adapter_layers(model):
        layer.set_active(name)
        if name is not None:
            for param in layer.adapter_parameters(name):
                param.requires_grad_(True)
    model.__dict__["peftkit_active"] = name
