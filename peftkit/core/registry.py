"""The method registry: name -> `Method` object, plus lookups by on-disk peft_type and by config class.

Methods register themselves when `peftkit.methods` is imported. The registry cannot import them (methods import
core, not the other way round), so the package `peftkit/__init__.py`, which runs before any peftkit module,
hands it a loader (`set_builtin_loader`) that every lookup calls once: the built-in methods are registered before
the first lookup, however deep the first import was (`from peftkit.train.run import train`), and `import peftkit`
stays light. Nothing else in peftkit names a method: the trainer, CLI and adapter I/O go through these lookups.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from peftkit.errors import PeftkitError

if TYPE_CHECKING:  # only a type here: importing core.method would load torch for a registry lookup
    from peftkit.core.method import Method

_METHODS: dict[str, Method] = {}
_builtin_loader: Callable[[], object] | None = None


def set_builtin_loader(loader: Callable[[], object]) -> None:
    """Install the function that registers the built-in methods (called by `peftkit/__init__.py`)."""
    global _builtin_loader
    _builtin_loader = loader


def _registered() -> dict[str, Method]:
    """The registry, after the built-in methods were loaded (once)."""
    global _builtin_loader
    loader, _builtin_loader = _builtin_loader, None
    if loader is not None:
        loader()
    return _METHODS


def register(method: Method) -> Method:
    """Add `method` to the registry under `method.name` (a second registration of a name is an error)."""
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def method_names() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_registered())


def get_method(name: str) -> Method:
    """The method registered as `name`; an unknown name is an error listing the registered ones."""
    try:
        return _registered()[name.lower()]
    except KeyError:
        raise PeftkitError(f"unknown method {name!r}; registered methods: {', '.join(method_names())}") from None


def method_for_peft_type(peft_type: str) -> Method:
    """The method that saves adapters with this `peft_type` (the first registered: lora before qlora for LORA)."""
    for method in _registered().values():
        if method.peft_type is not None and method.peft_type == peft_type:
            return method
    known = sorted(m.peft_type for m in _METHODS.values() if m.peft_type)
    raise PeftkitError(f"peftkit cannot load adapters of peft_type {peft_type!r}; it loads {', '.join(known)}")


def method_for_config(config: Any) -> Method:
    """The method whose config class `config` is an instance of (its exact class first: QloraConfig subclasses
    LoraConfig)."""
    methods = _registered().values()
    for method in [m for m in methods if type(config) is m.config_cls] + list(methods):
        if isinstance(config, method.config_cls):
            return method
    raise PeftkitError(f"{type(config).__name__} is not the config of a registered method ({', '.join(method_names())})")
