"""QLoRA (Dettmers et al. 2023, arXiv:2305.14314): LoRA over a base whose linear layers are quantized to 4-bit NF4
(or FP4, or 8-bit) by bitsandbytes.

The quantization happens when the base is loaded, not here: `load_options(config)` tells the loader what to ask
transformers for (`peftkit.io.models.load_model(..., quantize="nf4", double_quant=True, compute_dtype=...)`), the
trainer passes it on, and injection is LoRA's own (`LoraLayer` wraps a bitsandbytes `Linear4bit` as it wraps an
`nn.Linear`; the adapter's A and B are fp32). The saved adapter is a plain PEFT LoRA adapter (peft_type LORA): HF
PEFT loads it over the same bitsandbytes base; its peftkit.json records the quantization it was trained under
(`peftkit.io.quantize.quantization_record`), which `peftkit merge` uses to merge into the de-quantized base.

What PEFT's `prepare_model_for_kbit_training` does, and where peftkit does it:
- freeze the base: `inject` does for every method;
- cast half-precision non-quantized weights (norms, embeddings) to fp32: the trainer loads them in the precision's
  dtype (fp32 under `--precision fp32`; bf16 under amp / bf16, where transformers' norms compute in fp32 anyway and
  autocast runs the matmuls), and the LoRA weights are fp32 masters;
- make the embeddings' output require grad with gradient checkpointing: only needed by reentrant checkpointing
  (PEFT's own comment says so); peftkit's checkpointing is non-reentrant (`core.archs.enable_checkpointing`).

Options: `bits` 4 | 8 (as in `peftkit estimate`), `quant_type` nf4 | fp4, `double_quant` (default true),
`compute_dtype` auto | fp32 | bf16 | fp16 (auto: the dtype of the training precision), plus every LoRA option;
`--init loftq` (4-bit) starts the adapter at the quantization error's rank-r part (`loftq.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from peftkit.core.method import InitData
from peftkit.core.registry import register
from peftkit.core.shapes import ModelShape
from peftkit.errors import PeftkitError
from peftkit.methods.loftq import initialise_loftq
from peftkit.methods.lora.config import INITS, LoraConfig
from peftkit.methods.lora.inits import RESIDUAL_INITS
from peftkit.methods.lora.method import LoraMethod

log = logging.getLogger(__name__)

NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits + a double-quantised fp32 absmax per 64 weights (Dettmers 2023)
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class QloraConfig(LoraConfig):
    """LoRA's fields plus the base's quantization (bitsandbytes' names in the comments)."""

    bits: int = 4                 # 4: load_in_4bit; 8: load_in_8bit (LLM.int8())
    quant_type: str = "nf4"       # bnb_4bit_quant_type
    double_quant: bool = True     # bnb_4bit_use_double_quant
    compute_dtype: str = "auto"   # bnb_4bit_compute_dtype; auto: the training precision's dtype

    inits: ClassVar[tuple[str, ...]] = (*INITS, "loftq")  # loftq: `methods/loftq.py`

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits not in (4, 8) or isinstance(self.bits, bool):
            raise PeftkitError(f"qlora bits must be 4 (NF4 / FP4) or 8, got {self.bits!r}")
        if self.quant_type not in QUANT_TYPES:
            raise PeftkitError(f"qlora quant_type must be one of {', '.join(QUANT_TYPES)}, got {self.quant_type!r}")
        if not isinstance(self.double_quant, bool):
            raise PeftkitError(f"qlora double_quant must be true or false, got {self.double_quant!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise PeftkitError(f"qlora compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if self.init in RESIDUAL_INITS:
            raise PeftkitError(f"qlora cannot use init={self.init} (it rewrites the base weights, which are "
                               "quantized); use init=default, gaussian, eva or loftq")
        if self.init == "loftq" and self.bits != 4:
            raise PeftkitError("qlora init=loftq needs a 4-bit base (bits 4), as PEFT's LoftQ does")
        if self.use_dora:
            raise PeftkitError("qlora cannot use use_dora yet: DoRA's row norm needs the full-precision base weight, "
                               "which a quantized layer does not hold; use --method lora --set use_dora=true, or "
                               "qlora without DoRA")

    @property
    def quantize(self) -> str:
        """What `load_model(quantize=...)` takes: "nf4" | "fp4" | "int8"."""
        return "int8" if self.bits == 8 else self.quant_type


class QloraMethod(LoraMethod):
    """Registry entry for QLoRA (`--method qlora`): LoRA's injection and format over a quantized base.

    It saves peft_type LORA like `lora`; loading a LORA adapter goes to `lora`, registered first (the two load alike).
    """

    name = "qlora"
    config_cls = QloraConfig

    def load_options(self, config: QloraConfig) -> dict[str, Any]:
        """The quantized base this adapter trains over (`load_model` keyword arguments)."""
        compute = None if config.compute_dtype == "auto" else config.compute_dtype
        return {"quantize": config.quantize, "double_quant": config.double_quant, "compute_dtype": compute}

    def inject(self, model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
        """LoRA's injection; warns when the base is not quantized (then it is plain LoRA, whatever the name).

        `config` is typed as LoraMethod's (an override may not narrow it); it is the QloraConfig `build_config` made."""
        on_meta = any(p.device.type == "meta" for p in model.parameters())
        if not on_meta and not getattr(model, "is_quantized", False):
            quantize = config.quantize if isinstance(config, QloraConfig) else None
            log.warning("qlora over a base that is not quantized trains plain LoRA; load the base with "
                        "load_model(..., quantize=%r) (the trainer does)", quantize)
        super().inject(model, config, adapter_name)

    def initialise(self, model: nn.Module, config: LoraConfig, adapter_name: str, data: InitData) -> None:
        """`--init loftq`: A, B from each quantized layer's error against the stored weights (`loftq.py`)."""
        if config.init == "loftq":
            initialise_loftq(model, config, adapter_name, data.weight)
        else:
            super().initialise(model, config, adapter_name, data)

    def frozen_weight_bytes(self, config: QloraConfig, shape: ModelShape, frozen: int, bytes_per_param: int) -> float:
        """The decoder layers' linear weights quantized (NF4 / FP4: NF4_BYTES per weight; int8: 1 byte plus an fp32
        scale per row of d_in = h weights); the rest (embeddings, norms, biases) at `bytes_per_param`."""
        linear = shape.layers * sum(lin.d_in * lin.d_out for lin in shape.linears)
        per = NF4_BYTES if config.bits == 4 else 1 + 4 / shape.hidden
        return (frozen - linear) * bytes_per_param + linear * per


register(QloraMethod())
