"""The method registry: name -> `Method` object, plus lookups by on-disk peft_type and by config class.

Built-in methods register themselves when `peftkit.methods` is imported. The registry cannot import them (methods
import core, not the other way round), so the package `peftkit/__init__.py`, which runs before any peftkit module,
hands it a loader (`set_builtin_loader`) that the first lookup calls: the built-in methods are registered before
the first lookup, however deep the first import was (`from peftkit.train.run import train`), and `import peftkit`
stays light. Nothing else in peftkit names a method: the trainer, CLI, adapter I/O and the estimator go through
these lookups and the `Method` interface.

Plugins: after the built-ins, the first lookup also loads every Python entry point of group `peftkit.methods`
(`[project.entry-points."peftkit.methods"] ln_tuning = "peftkit_ln_tuning:LNTuningMethod"` in a package's
pyproject.toml), once.
An entry point gives a `Method` subclass or instance; a plugin that fails to import, gives something else, or
reuses a registered name is skipped with a one-line warning naming it. `register_method` (`peftkit.register_method`)
registers one from Python. See examples/ln_tuning_plugin/.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from peftkit.errors import PeftkitError

if TYPE_CHECKING:  # only a type here: importing core.method would load torch for a registry lookup
    from peftkit.core.method import Method

ENTRY_POINT_GROUP = "peftkit.methods"
log = logging.getLogger(__name__)

_METHODS: dict[str, Method] = {}
_builtin_loader: Callable[[], object] | None = None
_plugins_pending = True


def set_builtin_loader(loader: Callable[[], object]) -> None:
    """Install the function that registers the built-in methods (called by `peftkit/__init__.py`)."""
    global _builtin_loader
    _builtin_loader = loader


def _registered() -> dict[str, Method]:
    """The registry, after the built-in methods and then the plugins were loaded (once each)."""
    global _builtin_loader, _plugins_pending
    loader, _builtin_loader = _builtin_loader, None
    if loader is not None:
        loader()
    if _plugins_pending:
        _plugins_pending = False
        load_plugins()
    return _METHODS


def load_plugins() -> list[str]:
    """Register the methods of every `peftkit.methods` entry point; returns the names registered. A failing plugin
    is logged as one warning line naming it and skipped (the registry's first lookup calls this once)."""
    from importlib.metadata import entry_points

    names = []
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            method = _as_method(point.load())
            existing = _METHODS.get(method.name)
            if existing is None or type(existing) is not type(method):  # its module may have registered it already
                _add(method)
            names.append(method.name)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop peftkit: warn, name it, go on
            reason = str(exc).splitlines()[0] if str(exc) else ""
            log.warning("method plugin %r (%s) was not loaded: %s%s", point.name, point.value,
                        type(exc).__name__, f": {reason}" if reason else "")
    return names


def _as_method(obj: Any) -> Method:
    """The Method instance an entry point or `register_method` gives (a subclass is instantiated); checked."""
    from peftkit.core.method import Method

    if isinstance(obj, type) and issubclass(obj, Method):
        obj = obj()
    if not isinstance(obj, Method):
        raise PeftkitError(f"{obj!r} is not a peftkit Method (subclass peftkit.core.method.Method)")
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name or name != name.lower() or not name.replace("_", "").isalnum():
        raise PeftkitError(f"method name {name!r} is invalid; use lowercase letters, digits and underscores")
    if not isinstance(getattr(obj, "config_cls", None), type):
        raise PeftkitError(f"method {name!r} has no config_cls (its frozen config dataclass)")
    return obj


def _add(method: Method) -> None:
    if method.name in _METHODS:
        raise PeftkitError(f"method {method.name!r} is already registered; choose another name")
    _METHODS[method.name] = method


def register(method: Method) -> Method:
    """Add `method` to the registry under `method.name` (what a method module calls at import; a second
    registration of a name is an error)."""
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def register_method(method: Method | type[Method]) -> Method:
    """Register a method from Python (`peftkit.register_method`): a `Method` subclass or instance, after the
    built-ins and plugins, so a name that is taken is a one-line PeftkitError. Returns the registered instance."""
    method = _as_method(method)
    _registered()
    _add(method)
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
