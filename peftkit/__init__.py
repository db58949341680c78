"""peftkit: parameter-efficient fine-tuning for Hugging Face causal LMs, without a wrapper class.

    import peftkit
    model, tokenizer = peftkit.load_model()                  # embedded SmolLM2-135M-Instruct
    peftkit.inject(model, peftkit.LoraConfig(r=8))           # in place; the model stays a plain HF model
    ...train...
    peftkit.save_adapter(model, "out/adapter")               # HF PEFT format
    peftkit.merge(model)                                     # fold into the weights, remove the adapter modules

This module re-exports the public API; docs/architecture.md maps the packages behind it.

The re-exports are lazy (PEP 562): `import peftkit` loads neither torch nor transformers, so the CLI's `--help`
and `--version` are instant. Every method is still registered before anything can look one up: this module, which
Python runs before any peftkit submodule, gives the registry a loader that imports `peftkit.methods` (whose import
registers them all) on the first lookup, and then the method plugins (entry points of group `peftkit.methods`;
`register_method` adds one from Python; see `peftkit.core.registry`). Objectives are registered the same way
(`register_objective`, entry points of group `peftkit.objectives`; see `peftkit.train.objectives.base`).
It also hands `peftkit.core.state` the adapter writer that `model.save_pretrained` of an adapted model calls, so
saving never depends on which peftkit modules the user happened to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from peftkit._version import __version__
from peftkit.core import registry as _registry
from peftkit.core import state as _state
from peftkit.errors import PeftkitError

if TYPE_CHECKING:  # the same names for type checkers and IDEs; at run time __getattr__ imports them
    from peftkit.core.counting import trainable_parameters
    from peftkit.core.inject import inject
    from peftkit.core.ops import delete_adapter, disable_adapters, merge, merge_adapter, set_adapter, unmerge_adapter
    from peftkit.core.registry import register_method
    from peftkit.io.adapters import load_adapter, save_adapter
    from peftkit.io.models import load_model
    from peftkit.methods.bottleneck import AdapterConfig
    from peftkit.methods.loha import LohaConfig
    from peftkit.methods.lokr import LokrConfig
    from peftkit.methods.lora import LoraConfig
    from peftkit.methods.oft import OFTConfig
    from peftkit.methods.prefix import PrefixConfig
    from peftkit.methods.prompt import PromptConfig
    from peftkit.methods.qlora import QloraConfig
    from peftkit.train.objectives.base import register_objective

# Public name -> the module that defines it.
_LAZY = {
    "LoraConfig": "peftkit.methods.lora",
    "AdapterConfig": "peftkit.methods.bottleneck",
    "PrefixConfig": "peftkit.methods.prefix",
    "PromptConfig": "peftkit.methods.prompt",
    "QloraConfig": "peftkit.methods.qlora",
    "LokrConfig": "peftkit.methods.lokr",
    "LohaConfig": "peftkit.methods.loha",
    "OFTConfig": "peftkit.methods.oft",
    "inject": "peftkit.core.inject",
    "load_adapter": "peftkit.io.adapters",
    "save_adapter": "peftkit.io.adapters",
    "merge": "peftkit.core.ops",
    "merge_adapter": "peftkit.core.ops",
    "unmerge_adapter": "peftkit.core.ops",
    "set_adapter": "peftkit.core.ops",
    "disable_adapters": "peftkit.core.ops",
    "delete_adapter": "peftkit.core.ops",
    "trainable_parameters": "peftkit.core.counting",
    "load_model": "peftkit.io.models",
    "register_method": "peftkit.core.registry",
    "register_objective": "peftkit.train.objectives.base",
}

__all__ = [
    "__version__",
    "PeftkitError",
    "LoraConfig",
    "AdapterConfig",
    "PrefixConfig",
    "PromptConfig",
    "QloraConfig",
    "LokrConfig",
    "LohaConfig",
    "OFTConfig",
    "inject",
    "load_adapter",
    "save_adapter",
    "merge",
    "merge_adapter",
    "unmerge_adapter",
    "set_adapter",
    "disable_adapters",
    "delete_adapter",
    "trainable_parameters",
    "load_model",
    "register_method",
    "register_objective",
]


def __getattr__(name: str) -> Any:
    """Import a public name on first use (then it is a plain module attribute)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'peftkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _save_pretrained_adapter(*args: Any, **kwargs: Any) -> None:
    """`model.save_pretrained` of an adapted model (see peftkit.core.state): io's writer, imported on first use."""
    from peftkit.io.adapters import save_pretrained_adapter

    save_pretrained_adapter(*args, **kwargs)


_registry.set_builtin_loader(lambda: importlib.import_module("peftkit.methods"))
_state.set_adapter_writer(_save_pretrained_adapter)
