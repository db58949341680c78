"""Generic injection: target matching, module swapping, and the public `inject` entry point.

Target specs follow PEFT's semantics so configs mean the same thing in both tools:
- a list of names: a module matches when its path equals a name or ends with "." + name (suffix match);
- a string: a regular expression that must match the full module path (`re.fullmatch`);
- "all-linear": every nn.Linear / Conv1D except the output embedding (lm_head).
`layers_to_transform` keeps only modules inside the listed decoder-layer indices.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from peftkit.core.archs import LINEAR_TYPES, arch_spec
from peftkit.core.method import AdapterLayer
from peftkit.core.registry import get_method, method_for_config
from peftkit.core.state import AdapterRecord, activate, adapters, add_adapter
from peftkit.errors import PeftkitError

_LAYER_INDEX = re.compile(r"\.(\d+)(\.|$)")


def base_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) for every module of the base model; an AdapterLayer stands for the module it wraps.

    Modules inside an AdapterLayer (its base layer, lora_A, ...) are skipped, so a second adapter never targets the
    weights of the first.
    """
    out: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, AdapterLayer):
            inside.append(path)
        out.append((path, module))
    return out


def _wrapped(module: nn.Module) -> nn.Module:
    """The original module behind an AdapterLayer that wraps one (its `base_layer`), else the module itself."""
    return getattr(module, "base_layer", module) if isinstance(module, AdapterLayer) else module


def layer_index(path: str) -> int | None:
    """Decoder-layer index in a module path ("model.layers.3.mlp" -> 3), or None outside the layer stack."""
    match = _LAYER_INDEX.search(path)
    return int(match.group(1)) if match else None


def matches(path: str, targets: Sequence[str] | str) -> bool:
    """Whether module `path` is selected by a target list (name / suffix) or a regex string (full match)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def find_targets(
    model: nn.Module,
    targets: Sequence[str] | str | None,
    layers_to_transform: Sequence[int] | None = None,
    kinds: tuple[type, ...] = LINEAR_TYPES,
) -> list[str]:
    """Paths of the modules of the given kinds that `targets` selects (None = the architecture's defaults).

    Raises PeftkitError when nothing matches, listing the module names that exist, so a typo is easy to fix.
    """
    spec = arch_spec(model)
    if targets is None:
        targets = spec.lora_targets
    candidates = [(p, m) for p, m in base_modules(model) if isinstance(_wrapped(m), kinds)]
    if targets == "all-linear":
        selected = [p for p, _ in candidates if p.rsplit(".", 1)[-1] != spec.output_embedding]
    else:
        selected = [p for p, _ in candidates if matches(p, targets)]
    if layers_to_transform is not None:
        wanted = set(layers_to_transform)
        selected = [p for p in selected if layer_index(p) in wanted]
    if not selected:
        names = sorted({p.rsplit(".", 1)[-1] for p, _ in candidates if p})
        layers = f" in layers {sorted(layers_to_transform)}" if layers_to_transform is not None else ""
        raise PeftkitError(
            f"target modules {targets!r} match no {'/'.join(k.__name__ for k in kinds)} module{layers}; "
            f"the model has: {', '.join(names)}"
        )
    return selected


def refuse_unsupported_fields(config_json: dict, method: str,
                              fields: Sequence[str] = ("modules_to_save", "exclude_modules")) -> None:
    """Refuse a saved adapter config that sets one of `fields` (PEFT options such as modules_to_save or
    exclude_modules that peftkit's `method` does not implement): loading it while ignoring them would run another
    adapter than the one saved. One PeftkitError line naming the field."""
    for field in fields:
        if config_json.get(field):
            raise PeftkitError(f"this {method} adapter sets {field} ({config_json[field]!r}), which peftkit's "
                               f"{method} does not support; save it without {field}")


def saved_targets(model: nn.Module, paths: Sequence[str], given: Sequence[str] | str | None = None) -> list[str] | str:
    """`target_modules` as adapter_config.json should say it, so that PEFT re-creates exactly `paths`: `given` (the
    config's own spec) when it selects exactly them, else their module names when those do, else a regex of the
    paths (a `layers_to_transform` or a partial selection)."""
    names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    for spec in ([] if given is None else [given]) + [names]:
        try:
            if set(find_targets(model, spec)) == set(paths):
                return list(spec) if not isinstance(spec, str) else spec
        except PeftkitError:
            continue
    return "^(" + "|".join(re.escape(p) for p in paths) + ")$"


def replace_module(model: nn.Module, path: str, new: nn.Module | None) -> None:
    """Put `new` at dotted `path` in `model` (the parent's attribute is reassigned; None removes it)."""
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if new is None:
        delattr(parent, leaf)
    else:
        setattr(parent, leaf, new)


def inject(model: nn.Module, config: object, name: str = "default") -> nn.Module:
    """Add adapter `name` described by `config` (LoraConfig, ...) to `model` in place and return the model.

    The base weights are frozen, the new adapter becomes the active one and only its parameters are trainable.
    At initialisation the model computes exactly what the base model did (LoRA's B starts at zero, etc.). The new
    modules take the model's mode (torch builds modules in training mode: an eval model would get active dropout).
    """
    if not name or not isinstance(name, str) or "." in name:
        raise PeftkitError(f"adapter name {name!r} is invalid; use a non-empty name without dots")
    if name in adapters(model):
        raise PeftkitError(f"the model already has an adapter named {name!r}; pick another name")
    method = method_for_config(config)
    if method.trains_base:
        raise PeftkitError(f"method {method.name!r} trains the model's own weights and injects no adapter; "
                           "use apply_method (as the trainer does) instead of inject")
    existing = {id(module) for module in model.modules()}
    method.inject(model, config, name)
    for module in model.modules():
        if id(module) not in existing:
            module.training = model.training  # the flag alone: a wrapped base module keeps its own
    add_adapter(model, name, AdapterRecord(method=method.name, config=config))
    activate(model, name)
    return model


def apply_method(model: nn.Module, method_name: str, options: dict[str, Any]) -> Any:
    """Make the parameters `method_name` trains trainable, the one way the trainer, the estimator and the counts
    set a model up: an adapter method is injected (see `inject`); a `trains_base` method (full, freeze) marks base
    weights trainable. options: shared CLI names or config fields (`Method.field_options`). Returns the config."""
    method = get_method(method_name)
    config = method.build_config(options)
    if method.trains_base:
        method.make_trainable(model, config)
    else:
        inject(model, config)
    return config
