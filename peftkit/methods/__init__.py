"""The built-in methods, one module (or folder) each; importing this package registers every one of them.

    lora        LoRA (methods/lora/)                    adapter       bottleneck adapters (methods/bottleneck/)
    prefix      prefix tuning                           prompt        prompt tuning (both on virtual_tokens.py)
    full        full fine-tune (whole.py)               freeze        last N layers (whole.py)
    qlora       LoRA over a bitsandbytes-quantized base (qlora.py; registered after lora, which loads LORA files)
    oft         orthogonal fine-tuning: a block-diagonal rotation of each adapted linear's input (methods/oft/)

A method imports only `peftkit.core` (and `peftkit.errors`); nothing outside this package names a method.
"""

from peftkit.methods import bottleneck, lora, oft, prefix, prompt, qlora, whole

__all__ = ["bottleneck", "lora", "oft", "prefix", "prompt", "qlora", "whole"]
