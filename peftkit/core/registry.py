"""The method registry: name -> `Method` object, plus lookups by on-disk peft_type and by config class.

Methods register themselves when `peftkit.methods` is imported (which `import peftkit` does). Nothing else in
peftkit names a method: the trainer, CLI and adapter I/O go through these lookups.
"""

from __future__ import annotations

from typing import Any

from peftkit.core.method import Method
from peftkit.errors import PeftkitError

_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add `method` to the registry under `method.name` (a second registration of a name is an error)."""
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def method_names() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    """The method registered as `name`; an unknown name is an error listing the registered ones."""
    try:
        return _METHODS[name.lower()]
    except KeyError:
        raise PeftkitError(f"unknown method {name!r}; registered methods: {', '.join(method_names())}") from None


def method_for_peft_type(peft_type: str) -> Method:
    """The method that saves adapters with this `peft_type`."""
    for method in _METHODS.values():
        if method.peft_type is not None and method.peft_type == peft_type:
            return method
    known = sorted(m.peft_type for m in _METHODS.values() if m.peft_type)
    raise PeftkitError(f"peftkit cannot load adapters of peft_type {peft_type!r}; it loads {', '.join(known)}")


def method_for_config(config: Any) -> Method:
    """The method whose config class `config` is an instance of."""
    for method in _METHODS.values():
        if isinstance(config, method.config_cls):
            return method
    raise PeftkitError(f"{type(config).__name__} is not the config of a registered method ({', '.join(method_names())})")
