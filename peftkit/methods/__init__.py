"""The built-in methods, one module (or folder) each; importing this package registers every one of them.

    lora        LoRA (methods/lora/)                    adapter       bottleneck adapters (methods/bottleneck/)
    prefix      prefix tuning                           prompt        prompt tuning (both on virtual_tokens.py)
    full        full fine-tune (whole.py)               freeze        last N layers (whole.py)
    qlora       LoRA over a bitsandbytes-quantized base (qlora.py; registered after lora, which loads LORA files)
    lokr        LoKr, a Kronecker-product ΔW (lokr.py)  loha          LoHa, a Hadamard-product ΔW (loha.py)
                (both on lycoris.py: the layer building a whole ΔW, PEFT's LOKR / LOHA format)

A method imports only `peftkit.core` (and `peftkit.errors`); nothing outside this package names a method.
"""

from peftkit.methods import bottleneck, loha, lokr, lora, prefix, prompt, qlora, whole

__all__ = ["bottleneck", "loha", "lokr", "lora", "prefix", "prompt", "qlora", "whole"]
