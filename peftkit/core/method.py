"""Base classes every method builds on: `AdapterLayer` (modules holding adapters) and `Method` (registry entry).

A method is a module (or a folder) in `peftkit.methods`, or a plugin package (an entry point of group
`peftkit.methods`): a frozen config dataclass, its nn.Module(s) subclassing `AdapterLayer`, and a `Method` subclass
registered with `peftkit.core.registry.register`. The trainer, the CLI, adapter I/O and the memory estimator use
only the `Method` interface, so adding a method never touches them. The estimator's questions are the hooks after
`field_options` / `build_config`; their defaults describe an adapter over a frozen base whose own modules save
nothing for backward, so a simple adapter method overrides none or one of them.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import yaml
from torch import nn

from peftkit.core.method_options import SHARED
from peftkit.core.options import Option, coerce, kinds_of
from peftkit.core.shapes import BaseTraining, ModelShape, SavedActivations
from peftkit.errors import PeftkitError

PEFT_PREFIX = "base_model.model."  # HF PEFT's prefix of every saved tensor key


class AdapterLayer(nn.Module):
    """A module that holds the weights of one method for one or more named adapters.

    Subclasses keep per-adapter weights in `nn.ModuleDict` / `nn.ParameterDict` children keyed by adapter name, so
    `adapter_parameters(name)` finds them generically. `active_adapter` is the name used in forward (None = off);
    `merged_adapters` lists the adapters currently folded into the wrapped weights (only mergeable layers fill it).
    """

    active_adapter: str | None = None

    def __init__(self) -> None:
        super().__init__()
        self.merged_adapters: list[str] = []

    def set_active(self, name: str | None) -> None:
        """Use adapter `name` in forward (None, or a name this layer does not hold, turns the layer off); refused
        while another adapter is merged into the wrapped weights."""
        if self.merged_adapters and name not in self.merged_adapters:
            raise PeftkitError("unmerge the merged adapter (unmerge_adapter) before switching adapters")
        self.active_adapter = name if name in self.adapter_names() else None

    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer holds."""
        names: list[str] = []
        for child in self.children():
            if isinstance(child, (nn.ModuleDict, nn.ParameterDict)):
                names.extend(k for k in child if k not in names)
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

    def merge(self) -> None:
        """Fold the active adapter into the wrapped weights, reversibly. Layers that cannot merge refuse."""
        raise PeftkitError(f"{type(self).__name__} cannot be merged into base weights")

    def unmerge(self) -> None:
        """Take every merged adapter out of the wrapped weights again (nothing to do when none is merged)."""

    def unload(self, names: list[str]) -> nn.Module | None:
        """Fold adapters `names` into the wrapped module and return what replaces this layer (None: remove it).

        The default is for methods that cannot merge: with no names, the layer is simply removed.
        """
        if names:
            raise PeftkitError(f"{type(self).__name__} cannot be merged into base weights")
        return None


@dataclass(frozen=True)
class InitData:
    """What a data-driven init may read (`Method.initialise`); each is fetched only when called.

    batches(): an endless iterator of training micro-batches (dicts of `input_ids`, `labels` (-100 where not a
    target), `attention_mask` or `position_ids`), on the model's device, cycling through the training data from
    its first micro-batch (EVA reads the layer inputs of as many as its SVD needs to converge).
    weight(path): the stored full-precision weight of the base model's module `path` (its `<path>.weight` in the
    model's safetensors files), as saved, [out, in] for a linear layer (LoftQ reads what the quantized base lost).
    """

    batches: Callable[[], Iterator[dict[str, torch.Tensor]]]
    weight: Callable[[str], torch.Tensor]


class Method:
    """A registered method: how to build its config, apply it to a model, and move it to and from PEFT's format.

    Class attributes: `name` (CLI / registry name), `peft_type` (on-disk type; None for methods that save a whole
    model), `config_cls` (frozen dataclass), `mergeable` (can be folded into the base weights; else
    `why_not_mergeable` explains), `option_fields` (shared option of `core/method_options` -> the config field it
    sets, e.g. {"rank": "r"}; the config checks that field with the same Option), `trains_base` (the method
    trains the model's own weights, as full and freeze fine-tunes do, instead of injecting an adapter), `default_lr`,
    `bundled_lr` (an adapter's learning rate on the bundled task, when the trainer's bundled default does not suit it).
    """

    name: ClassVar[str]
    peft_type: ClassVar[str | None] = None
    config_cls: ClassVar[type]
    mergeable: ClassVar[bool] = False
    why_not_mergeable: ClassVar[str] = ""
    option_fields: ClassVar[dict[str, str]] = {}
    trains_base: ClassVar[bool] = False
    default_lr: ClassVar[float] = 2e-4  # the trainer's learning rate when none is given for the user's data
    peft_refuses_conv1d: ClassVar[bool] = False  # HF PEFT refuses this method on GPT-2's Conv1D (`peft_refusal`)
    bundled_lr: ClassVar[float | None] = None  # an adapter's learning rate on the bundled task (no --data) where
    # the trainer's bundled 2e-3 does not suit it (VeRA's two vectors per layer barely move at 2e-3 in 30 steps)

    def inject(self, model: nn.Module, config: Any, adapter_name: str) -> None:
        """Add adapter `adapter_name` described by `config` to `model` in place."""
        raise NotImplementedError

    def make_trainable(self, model: nn.Module, config: Any) -> None:
        """For `trains_base` methods: set `requires_grad` on the base weights this method trains."""
        raise NotImplementedError

    def load_options(self, config: Any) -> dict[str, Any]:
        """Keyword arguments of `peftkit.io.models.load_model` this method needs the base loaded with (the trainer
        passes them): qlora asks for a quantized base (`quantize`, `double_quant`, `compute_dtype`); most need none."""
        return {}

    def initialise(self, model: nn.Module, config: Any, adapter_name: str, data: InitData) -> None:
        """Initialise adapter `adapter_name` (injected with `config`) from data, before the first training step.
        The trainer calls it once per run after injecting, with the model on its device and before the optimizer
        sees the parameters, so an init may replace them (new shapes, fewer modules; it records a changed config
        with `core.state.set_adapter_config`). The default reads nothing: most inits happen in `inject`. LoRA's eva
        reads `data.batches()`, qlora's loftq `data.weight(path)`."""

    def export(self, model: nn.Module, adapter_name: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """(adapter_config.json dict, tensors keyed as PEFT saves them) for one adapter."""
        raise NotImplementedError

    def load(self, model: nn.Module, config_json: dict, tensors: dict[str, torch.Tensor], adapter_name: str) -> Any:
        """Inject the adapter saved as (config_json, tensors) and load its weights; returns its config."""
        raise NotImplementedError

    def peft_refusal(self, config_json: dict) -> str | None:
        """Why HF PEFT 0.21.2 refuses to load this method's adapter saved with `config_json` (its
        adapter_config.json), or None when PEFT's loading rules accept it; `peftkit check` asks before it says PEFT
        loads an adapter. The default applies `peft_refuses_conv1d` to the config's fan_in_fan_out (the adapted
        layers are GPT-2's Conv1D, which PEFT's OFT, LoKr and LoHa refuse)."""
        if self.peft_refuses_conv1d and config_json.get("fan_in_fan_out"):
            return (f"it adapts Conv1D layers (GPT-2's, fan_in_fan_out), which PEFT's {self.peft_type} refuses "
                    "(it takes Linear and Conv layers only)")
        return None

    def shared_option(self, key: str) -> Option | None:
        """The shared option behind `key`, named as the option (`rank`) or as this method's config field (`r`)."""
        key = key.replace("-", "_")
        for name, field in self.option_fields.items():
            if key in (name, field):
                return SHARED[name]
        return None

    def canonical_key(self, key: str) -> str:
        """The one name of a `--set` / recipe key: the shared option behind a config field (`r` -> `rank`,
        `lora_alpha` -> `alpha`), else the key (dashes as underscores)."""
        shared = self.shared_option(key)
        return shared.name if shared else key.replace("-", "_")

    def field_options(self, options: dict[str, Any], check: bool = True) -> dict[str, Any]:
        """Options keyed by config field, typed: shared options (`rank`, `alpha`, ... or their fields `r`,
        `lora_alpha`) become field names checked by their `Option`; other fields' values (strings from `--set
        key=value` are YAML scalars: `true`, `4`, `[a, b]`) are coerced to the field's annotated type; unset (None)
        ones are dropped, an unknown key is an error listing the valid ones. This is the one place where option
        vocabularies are translated. With check=False unknown keys pass through (for callers that validate them
        with their own message)."""
        hints = typing.get_type_hints(self.config_cls)
        out: dict[str, Any] = {}
        for key, value in options.items():
            if value is None:
                continue
            shared = self.shared_option(key)
            if shared is not None:
                out[self.option_fields[shared.name]] = shared.check(value)
                continue
            field = key.replace("-", "_")
            value = parse_scalar(value) if isinstance(value, str) else value
            if field in hints:
                out[field] = typed_field(field, value, hints[field])
            elif check:
                valid = sorted(set(hints) - set(self.option_fields.values()) | set(self.option_fields)) or ["none"]
                raise PeftkitError(f"method {self.name!r} has no option {key!r}; valid options: {', '.join(valid)}")
            else:
                out[field] = value
        return out

    def build_config(self, options: dict[str, Any]) -> Any:
        """The config from options named as in `field_options`; invalid values are errors naming the field."""
        try:
            return self.config_cls(**self.field_options(options))
        except TypeError as exc:
            raise PeftkitError(f"invalid options for method {self.name!r}: {exc}") from None

    # What the memory estimator (peftkit.memory, docs/memory.md) and the trainer ask. Each receives the built config
    # (`build_config`: the method's own defaults and validation) and, where sizes matter, the model's `ModelShape`.

    def check_setup(self, config: Any, *, gradient_checkpointing: bool) -> None:
        """Raise PeftkitError (one line) for a training setup this method cannot run; the default accepts all.
        (prefix tuning: transformers drops the KV cache holding the prefix under gradient checkpointing)."""

    def trained_base(self, config: Any, shape: ModelShape) -> BaseTraining | None:
        """Which of the base model's own weights train (`trains_base` methods: full -> every layer and the rest,
        freeze -> the top `layers` layers); None (the default) for a frozen base with an adapter on it."""
        return None

    def saved_activations(self, config: Any, shape: ModelShape, act_bytes: int, seq_len: int) -> SavedActivations:
        """Bytes per token the method's own modules save for backward, beyond the frozen decoder's own (default
        none), and bytes per layer that do not grow with the tokens (`SavedActivations.weights_per_layer`). act_bytes: bytes of one activation element in the compute dtype (2 under bf16 / amp, 4 in fp32);
        seq_len: real tokens per row. Counted from what each op of the method's forward saves (docs/memory.md)."""
        return SavedActivations()

    def extra_positions(self, config: Any) -> int:
        """Positions the decoder runs over beyond a row's real tokens (prompt tuning prepends its virtual tokens)."""
        return 0

    def frozen_weight_bytes(self, config: Any, shape: ModelShape, frozen: int, bytes_per_param: int) -> float:
        """Bytes the `frozen` parameters take in memory when unquantized ones take `bytes_per_param` each (the
        default); qlora's quantized linears take less. The quantization itself happens at load (`load_options`)."""
        return frozen * bytes_per_param


def copy_saved_tensors(method: str, wanted: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Copy a file's `tensors` into the model's tensors `wanted` (both keyed as the file names them): the key sets
    must be equal and each shape the same, else a one-line PeftkitError naming the first key that differs."""
    for key in sorted(set(tensors) ^ set(wanted)):
        what = f"is not a {method} tensor of this model" if key in tensors else "is missing from the file"
        raise PeftkitError(f"{method} tensor {key!r} {what} (was the adapter trained for another base model?)")
    with torch.no_grad():
        for key, target in wanted.items():
            if tensors[key].shape != target.shape:
                raise PeftkitError(f"{method} tensor {key!r} has shape {tuple(tensors[key].shape)}, the model needs "
                                   f"{tuple(target.shape)}")
            target.copy_(tensors[key])


def typed_field(field: str, value: Any, hint: Any) -> Any:
    """`value` as a config field of type `hint` (PeftkitError naming the field otherwise); a single value where a
    list (tuple) is wanted is a list of one (`--set layers_to_transform=1`)."""
    kinds = kinds_of(hint)
    if tuple in kinds and not isinstance(value, (list, tuple)):
        try:
            return coerce(field, value, kinds)
        except PeftkitError:
            return coerce(field, [value], kinds)
    return coerce(field, value, kinds)


def parse_scalar(text: str) -> Any:
    """Parse a command-line value as a YAML scalar ("4" -> 4, "true" -> True, "[a, b]" -> a list); a value YAML
    cannot parse stays the raw string."""
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


SIZE_MAX = 1 << 20  # no layer count or hidden width of a real model comes near it (ranks, virtual tokens and
# reduction factors are the shared options of core/method_options.py, bounded there)


def check_positive(field: str, value: object) -> None:
    """Raise PeftkitError unless `value` is a positive int of at most SIZE_MAX (bools are not ints here): these
    values size tensors, and an absurd one would otherwise fail deep in torch with an overflow."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= SIZE_MAX:
        raise PeftkitError(f"{field} must be a positive integer of at most {SIZE_MAX}, got {value!r}")
