"""LoRA (Hu et al. 2021): `config` (LoraConfig), `layer` (the module), `format` (HF PEFT's on-disk LoRA format, the
one reader and writer), `saved` (PEFT's modules_to_save), `method` (the registered Method)."""

from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.method import LoraMethod

__all__ = ["LoraConfig", "LoraMethod"]
