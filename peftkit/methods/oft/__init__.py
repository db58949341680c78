"""OFT, orthogonal fine-tuning (Qiu et al. 2023): config (PEFT's OFTConfig), layer (the rotation), method (the
registry entry and PEFT's format)."""

from peftkit.methods.oft.config import OFTConfig
from peftkit.methods.oft.method import OftMethod

__all__ = ["OFTConfig", "OftMethod"]
