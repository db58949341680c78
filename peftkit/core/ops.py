"""Model-level operations on injected adapters: switch, disable, merge, unmerge, delete.

All functions act in place on the user's HF model; there is no wrapper class.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from peftkit.core.inject import replace_module
from peftkit.core.registry import get_method
from peftkit.core.state import activate, active_adapter, adapter_layers, adapters, remove_adapters, resolve_name
from peftkit.errors import PeftkitError


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make adapter `name` the active one (used in forward and trainable); others stay loaded but off."""
    activate(model, resolve_name(model, name))
    return model


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside the block: every adapter is off (a merged adapter is unmerged meanwhile)."""
    name = active_adapter(model)
    merged = _is_merged(model)
    if merged:
        unmerge_adapter(model)
    for _, layer in adapter_layers(model):
        layer.set_active(None)
    try:
        yield model
    finally:
        for _, layer in adapter_layers(model):
            layer.set_active(name)
        if merged:
            merge_adapter(model)


def _require_mergeable(model: nn.Module, names: Sequence[str]) -> None:
    """Refuse, with the method's reason, when one of the adapters cannot be folded into the weights."""
    if getattr(model, "is_quantized", False):
        raise PeftkitError("cannot merge into a quantized (bitsandbytes) base in memory: its weights are 4/8-bit. Save "
                           "the adapter and run `peftkit merge`, which merges into the de-quantized base")
    for name in names:
        method = get_method(adapters(model)[name].method)
        if not method.mergeable:
            raise PeftkitError(
                f"adapter {name!r} ({method.name}) cannot be merged into the base weights: {method.why_not_mergeable} "
                "Save it with save_adapter and load it at inference instead"
            )


def _is_merged(model: nn.Module) -> bool:
    return any(layer.merged_adapters for _, layer in adapter_layers(model))


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold the active adapter into the base weights, reversibly (`unmerge_adapter` takes it out again)."""
    name = resolve_name(model, None)
    _require_mergeable(model, [name])
    for _, layer in adapter_layers(model):
        if name in layer.adapter_names():
            layer.merge()
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Take merged adapters back out of the base weights."""
    for _, layer in adapter_layers(model):
        if layer.merged_adapters:
            layer.unmerge()
    return model


def merge(model: nn.Module, names: Sequence[str] | None = None) -> nn.Module:
    """Merge-and-unload: fold adapters into the weights and remove every adapter module.

    names: the adapters to fold in (default: every adapter on the model, summed). Each weight gets the sum of the
    deltas in fp32 and one rounding to its dtype. Refused, with nothing changed, if an adapter cannot be merged
    (prefix / prompt tuning, non-linear bottleneck adapters).
    """
    known = adapters(model)
    names = list(known) if names is None else [resolve_name(model, n) for n in names]
    if not names:
        raise PeftkitError("the model has no adapter to merge")
    _require_mergeable(model, list(known))
    unmerge_adapter(model)
    for path, layer in list(adapter_layers(model)):
        replace_module(model, path, layer.unload([n for n in names if n in layer.adapter_names()]))
    remove_adapters(model, list(known))  # the model saves as a plain HF model again
    activate(model, None)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter `name` and its modules; another adapter (if any) becomes active."""
    name = resolve_name(model, name)
    if _is_merged(model):
        raise PeftkitError("unmerge the merged adapter (unmerge_adapter) before deleting adapters")
    for _, layer in adapter_layers(model):
        layer.delete_adapter(name)
    for path, layer in list(adapter_layers(model)):
        if not layer.adapter_names():
            replace_module(model, path, layer.unload([]))
    remove_adapters(model, [name])
    activate(model, next(iter(adapters(model)), None))
    return model
