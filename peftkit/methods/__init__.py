"""The built-in methods, one module each. `load_builtin()` imports them, which registers each one.

The import is a function (called at the end of `peftkit/__init__.py`) rather than module-level imports here, so
that `peftkit.core.method` can be imported by the core modules before any method module needs them.
"""

import importlib

BUILTIN_METHODS = ("lora", "bottleneck", "prefix", "prompt")


def load_builtin() -> None:
    """Import every built-in method module (idempotent)."""
    for name in BUILTIN_METHODS:
        importlib.import_module(f"peftkit.methods.{name}")
