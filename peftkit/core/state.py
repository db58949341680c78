"""Everything peftkit keeps on a HF model (no wrapper class), in one place: these functions are the only readers
and writers of the `peftkit_*` entries of `model.__dict__`.

    peftkit_adapters       adapter name -> AdapterRecord(method, config)
    peftkit_active         the active adapter's name
    peftkit_base_id        the hub id adapters record as base_model_name_or_path (set when loading the embedded model)
    peftkit_base_note      a note on the base weights (the embedded model's were de-quantized from GGUF)
    peftkit_prompt_format  how prompts were rendered in training (set by load_adapter from peftkit.json)
    save_pretrained        while the model has adapters: an `AdapterSavePretrained`, shadowing HF's method

They live in `__dict__`, not as module attributes, so nn.Module never sees them (no state_dict entry, no
registration). The adapter weights themselves live in `AdapterLayer` submodules of the model, so the optimizer,
accelerate and DDP see them as ordinary parameters.

`model.save_pretrained` of an adapted model writes the adapter, as on a PEFT model, so the HF Trainer
(`save_model`, its checkpoints), `push_to_hub` and every other caller of HF's method save the adapter folder rather
than a base whose adapted weights are stored under keys no loader knows. No wrapper class and no patched
transformers code: `add_adapter` (the one place an adapter is recorded) puts an `AdapterSavePretrained` into
`model.__dict__["save_pretrained"]`, where instance lookup finds it before the class's method, and
`remove_adapters` (merge, delete_adapter) takes it out with the last adapter, so a merged model saves as the plain
model it is again. Writing the folder is io's business and core imports no io: the package `peftkit/__init__.py`,
which Python runs before any peftkit module, hands this module the writer (`set_adapter_writer`: a function that
imports `peftkit.io.adapters` when called), as it hands the registry its loader. So the save works whatever the
user imported, and this module loads no torch at import (it is imported by `import peftkit`). The hook holds the model (not a weak reference) so that `copy.deepcopy` and pickling carry
it over to the copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftkit.errors import PeftkitError

if TYPE_CHECKING:  # types only: `import peftkit` imports this module and must not load torch
    from torch import nn

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


def add_adapter(model: nn.Module, name: str, record: AdapterRecord) -> None:
    """Record adapter `name` (injected by its method); the first one installs the `save_pretrained` hook."""
    adapters(model)[name] = record
    model.__dict__["save_pretrained"] = AdapterSavePretrained(model)


def set_adapter_config(model: nn.Module, name: str, config: Any) -> None:
    """Replace the config recorded for adapter `name` (an init that changed it: EVA's ranks and modules)."""
    adapters(model)[name].config = config


def remove_adapters(model: nn.Module, names: list[str]) -> None:
    """Forget the adapters `names` (their modules are gone); with the last one goes the `save_pretrained` hook."""
    known = adapters(model)
    for name in names:
        known.pop(name, None)
    if not known:
        model.__dict__.pop("save_pretrained", None)


# Writes the active adapter's folder: (model, directory, **save_pretrained kwargs) -> None. Set by peftkit/__init__.
_adapter_writer: Callable[..., None] | None = None


def set_adapter_writer(writer: Callable[..., None]) -> None:
    """Register the function `model.save_pretrained` of an adapted model calls (`peftkit/__init__.py` does)."""
    global _adapter_writer
    _adapter_writer = writer


class AdapterSavePretrained:
    """`model.save_pretrained` while the model has adapters: writes the active adapter's PEFT folder through the
    registered writer, which receives HF's keyword arguments (the Trainer's state_dict, is_main_process, ...)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: Any, is_main_process: bool = True, *_hf_args: Any, **kwargs: Any) -> None:
        # HF's signature: save_pretrained(save_directory, is_main_process=True, state_dict=None, ...)
        if _adapter_writer is None:
            raise PeftkitError("saving an adapted model needs peftkit's adapter writer; none is registered "
                               "(peftkit/__init__.py registers it: was peftkit.core.state reloaded?)")
        _adapter_writer(self.model, save_directory, is_main_process=is_main_process, **kwargs)

    def __repr__(self) -> str:
        return f"<peftkit save_pretrained: writes the active adapter of {type(self.model).__name__}>"


def base_model_id(model: nn.Module) -> str | None:
    """The base model's hub id (or path) as adapters record it, like PEFT's `base_model_name_or_path`."""
    return model.__dict__.get("peftkit_base_id") or getattr(model, "name_or_path", None) or None


def base_model_note(model: nn.Module) -> str | None:
    """A note on where the base weights came from, or None."""
    return model.__dict__.get("peftkit_base_note")


def set_base_model(model: nn.Module, hub_id: str, note: str | None) -> None:
    """Record the hub id adapters of `model` name as their base (and a note on its weights)."""
    model.__dict__["peftkit_base_id"] = hub_id
    model.__dict__["peftkit_base_note"] = note


def prompt_format(model: nn.Module) -> dict | None:
    """The prompt format an adapter loaded into `model` was trained with ({"chat_template": ...} or
    {"plain_template": ...}), or None."""
    return model.__dict__.get("peftkit_prompt_format")


def set_prompt_format(model: nn.Module, value: dict) -> None:
    """Record the prompt format that `generate`, `eval` and `save_adapter` reuse."""
    model.__dict__["peftkit_prompt_format"] = value


def active_adapter(model: nn.Module) -> str | None:
    """Name of the active adapter, or None."""
    return model.__dict__.get("peftkit_active")


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """Every AdapterLayer in the model with its dotted path."""
    from peftkit.core.method import AdapterLayer

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
