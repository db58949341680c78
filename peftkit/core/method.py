"""Base classes every method builds on: `AdapterLayer` (modules holding adapters) and `Method` (registry entry).

A method is one file in this package: a frozen config dataclass, its nn.Module(s) subclassing `AdapterLayer`, and
a `Method` subclass registered with `peftkit.core.registry.register`. The trainer, the CLI and adapter I/O use only the
`Method` interface, so adding a method never touches them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import yaml
from torch import nn

from peftkit.errors import PeftkitError

PEFT_PREFIX = "base_model.model."


class AdapterLayer(nn.Module):
    """A module that holds the weights of one method for one or more named adapters.

    Subclasses keep per-adapter weights in `nn.ModuleDict` / `nn.ParameterDict` children keyed by adapter name, so
    `adapter_parameters(name)` finds them generically. `active_adapter` is the name used in forward (None = off).
    """

    active_adapter: str | None = None

    def set_active(self, name: str | None) -> None:
        """Use adapter `name` in forward (None, or a name this layer does not hold, turns the layer off)."""
        self.active_adapter = name if name in self.adapter_names() else None

    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer holds."""
        names: list[str] = []
        for child in self.children():
            if isinstance(child, (nn.ModuleDict, nn.ParameterDict)):
                names.extend(k for k in child.keys() if k not in names)
        return names

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """The parameters of adapter `name` in this layer."""
        for child in self.children():
            if isinstance(child, nn.ModuleDict) and name in child:
                yield from child[name].parameters()
            elif isinstance(child, nn.ParameterDict) and name in child:
                yield child[name]

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` from this layer."""
        for child in self.children():
            if isinstance(child, (nn.ModuleDict, nn.ParameterDict)) and name in child:
                del child[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def unload(self, names: list[str]) -> nn.Module | None:
        """Fold adapters `names` into the wrapped module and return what replaces this layer (None: remove it).

        The default is for methods that cannot merge: with no names, the layer is simply removed.
        """
        if names:
            raise PeftkitError(f"{type(self).__name__} cannot be merged into base weights")
        return None


class Method:
    """A registered PEFT method: how to build its config, inject it, and move it to and from PEFT's format.

    Class attributes: `name` (CLI / registry name), `peft_type` (on-disk type), `config_cls` (frozen dataclass),
    `mergeable` (can be folded into the base weights; else `why_not_mergeable` explains), `cli_aliases` (shared CLI option -> config field).
    """

    name: ClassVar[str]
    peft_type: ClassVar[str]
    config_cls: ClassVar[type]
    mergeable: ClassVar[bool] = False
    why_not_mergeable: ClassVar[str] = ""
    cli_aliases: ClassVar[dict[str, str]] = {}

    def inject(self, model: nn.Module, config: Any, adapter_name: str) -> None:
        """Add adapter `adapter_name` described by `config` to `model` in place."""
        raise NotImplementedError

    def export(self, model: nn.Module, adapter_name: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """(adapter_config.json dict, tensors keyed as PEFT saves them) for one adapter."""
        raise NotImplementedError

    def load(self, model: nn.Module, config_json: dict, tensors: dict[str, torch.Tensor], adapter_name: str) -> Any:
        """Inject the adapter saved as (config_json, tensors) and load its weights; returns its config."""
        raise NotImplementedError

    def build_config(self, options: dict[str, Any]) -> Any:
        """Config from CLI-style options: shared option names (`rank`, `alpha`, ...) or config field names.

        Values given as strings (from `--set key=value`) are parsed as YAML scalars, so `true`, `4` and `[a, b]`
        become bool, int and list. Unknown keys are an error listing the valid ones.
        """
        fields = {f.name for f in dataclasses.fields(self.config_cls)}
        kwargs: dict[str, Any] = {}
        for key, value in options.items():
            if value is None:
                continue
            field = self.cli_aliases.get(key, key).replace("-", "_")
            if field not in fields:
                valid = sorted(fields | set(self.cli_aliases))
                raise PeftkitError(f"method {self.name!r} has no option {key!r}; valid options: {', '.join(valid)}")
            if isinstance(value, str):
                value = _parse_scalar(value)
            kwargs[field] = value
        try:
            return self.config_cls(**kwargs)
        except TypeError as exc:
            raise PeftkitError(f"invalid options for method {self.name!r}: {exc}") from None


def _parse_scalar(text: str) -> Any:
    """Parse a command-line value as a YAML scalar ("4" -> 4, "true" -> True); fall back to the raw string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def config_fields(config: Any) -> dict[str, Any]:
    """A config dataclass as a plain dict (tuples become lists, for JSON)."""
    out = {}
    for key, value in dataclasses.asdict(config).items():
        out[key] = list(value) if isinstance(value, tuple) else value
    return out
