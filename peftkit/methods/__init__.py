"""The built-in methods, one module (or folder) each; importing this package registers every one of them.

    lora        LoRA (methods/lora/)                    adapter       bottleneck adapters (methods/bottleneck/)
    prefix      prefix tuning                           prompt        prompt tuning (both on virtual_tokens.py)
    full        full fine-tune (whole.py)               freeze        last N layers (whole.py)
    qlora       LoRA over a bitsandbytes-quantized base (qlora.py; registered after lora, which loads LORA files)
    ia3         IA3: a learned scale per output / input (ia3.py)
    vera        VeRA: two vectors per layer on shared frozen random projections (vera.py)
    lokr        LoKr, a Kronecker-product ΔW (lokr.py)  loha          LoHa, a Hadamard-product ΔW (loha.py)
                (both on lycoris.py: the layer building a whole ΔW, PEFT's LOKR / LOHA format)
    oft         orthogonal fine-tuning: a block-diagonal rotation of each adapted linear's input (methods/oft/)

A method imports only `peftkit.core` (and `peftkit.errors`); nothing outside this package names a method.
"""

from peftkit.methods import bottleneck, ia3, loha, lokr, lora, oft, prefix, prompt, qlora, vera, whole

__all__ = ["bottleneck", "ia3", "loha", "lokr", "lora", "oft", "prefix", "prompt", "qlora", "vera", "whole"]
