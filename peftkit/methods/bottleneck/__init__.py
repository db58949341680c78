"""Bottleneck adapters (Houlsby, Pfeiffer, parallel): `layer` (the modules), `method` (config and Method)."""

from peftkit.methods.bottleneck.method import AdapterConfig, AdapterMethod

__all__ = ["AdapterConfig", "AdapterMethod"]
