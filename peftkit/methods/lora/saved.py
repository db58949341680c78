"""PEFT's `modules_to_save`: whole modules an adapter carries in full (a trained norm, embedding, head).

HF PEFT 0.21 saves them as `base_model.model.<module path>.<param>` (no adapter name) and lists the module names
(matched like target names: the path equals a name or ends with "." + name) in `modules_to_save`. peftkit keeps
the adapter's copy beside the original in a `SavedModuleLayer`, so switching or disabling adapters still works,
and merging (unload) puts the copy in the model.

Limitation: when the saved module's weight is tied to another module (a tied input embedding), only the saved
module uses the copy; loading refuses that case rather than silently changing one side of the tie.
"""

from __future__ import annotations

import copy
import re
from typing import cast

import torch
from torch import nn

from peftkit.core.inject import base_modules, replace_module
from peftkit.core.method import PEFT_PREFIX, AdapterLayer
from peftkit.errors import PeftkitError


class SavedModuleLayer(AdapterLayer):
    """The original module (`base_layer`) plus one full copy per adapter (`modules_to_save[name]`)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.modules_to_save = nn.ModuleDict()

    @property
    def weight(self) -> torch.Tensor:
        """The original module's weight (`nn.Module.__getattr__` types it as `Tensor | Module`)."""
        return cast(torch.Tensor, self.base_layer.weight)

    def add(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Add adapter `name`'s copy of the module with the given parameters (every one must be given)."""
        module = copy.deepcopy(self.base_layer)
        missing = set(dict(module.named_parameters())) - set(state)
        if missing:
            raise PeftkitError(f"modules_to_save tensors lack {sorted(missing)}; the adapter file is incomplete")
        module.load_state_dict(state, strict=True)
        self.modules_to_save[name] = module

    def merge(self) -> None:
        """Nothing to fold: the active copy already replaces the module in forward."""

    def unmerge(self) -> None:
        """Nothing to unfold."""

    def unload(self, names: list[str]) -> nn.Module:
        """The copy of the last adapter in `names` this layer holds (merge), else the original module."""
        held = [n for n in names if n in self.modules_to_save]
        return self.modules_to_save[held[-1]] if held else self.base_layer

    def forward(self, *args, **kwargs):
        name = self.active_adapter
        if name is not None and name in self.modules_to_save:
            return self.modules_to_save[name](*args, **kwargs)
        return self.base_layer(*args, **kwargs)


def split_saved(tensors: dict[str, torch.Tensor], names: list[str]) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """({module path: {param: tensor}} of the modules_to_save tensors, the remaining (LoRA) tensors)."""
    saved: dict[str, dict] = {}
    rest = {}
    for key, value in tensors.items():
        bare = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        bare = re.sub(r"\.modules_to_save\.[^.]+\.", ".", bare)  # older files keep the wrapper's path
        module, _, param = bare.rpartition(".")
        if ".lora_" not in bare and any(module == n or module.endswith("." + n) for n in names):
            saved.setdefault(module, {})[param] = value
        else:
            rest[key] = value
    return saved, rest


def load_saved_modules(model: nn.Module, saved: dict[str, dict], adapter_name: str) -> None:
    """Wrap each saved module in a SavedModuleLayer (or reuse one) and add the adapter's copy."""
    modules = dict(base_modules(model))
    for path, state in saved.items():
        module = modules.get(path)
        if module is None:
            raise PeftkitError(f"the adapter saves module {path!r} in full (modules_to_save), which this model lacks")
        if not isinstance(module, SavedModuleLayer):
            owners = [n for n, m in modules.items() if n != path and any(p is q for p in m.parameters(recurse=False)
                                                                      for q in module.parameters(recurse=False))]
            if owners:
                raise PeftkitError(f"module {path!r} saved in full shares its weight with {owners[0]!r} (tied); "
                                   "peftkit cannot load it without breaking the tie: merge it with `peftkit merge`")
            module = SavedModuleLayer(module)
            replace_module(model, path, module)
        for param, value in state.items():
            ref = dict(module.base_layer.named_parameters()).get(param)
            if ref is None or tuple(ref.shape) != tuple(value.shape):
                raise PeftkitError(f"modules_to_save tensor {path}.{param} has shape {tuple(value.shape)}, the model's "
                                   f"is {None if ref is None else tuple(ref.shape)}")
        module.add(adapter_name, {k: v.to(module.base_layer.weight.dtype) for k, v in state.items()})


def export_saved(model: nn.Module, adapter_name: str) -> tuple[list[str], dict[str, torch.Tensor]]:
    """(module paths, PEFT-layout tensors) of the modules adapter `adapter_name` saves in full."""
    paths, tensors = [], {}
    for path, module in base_modules(model):
        if isinstance(module, SavedModuleLayer) and adapter_name in module.modules_to_save:
            paths.append(path)
            for param, value in module.modules_to_save[adapter_name].named_parameters():
                tensors[f"{PEFT_PREFIX}{path}.{param}"] = value.detach().contiguous()
    return paths, tensors
