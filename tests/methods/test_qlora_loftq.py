"""LoftQ (`--method qlora --init loftq`): the adapter starts at the rank-r part of the quantization error, so the
quantized model's logits move towards the full-precision model's (a test that fails if they do not); A, B are what
PEFT's `replace_lora_weights_loftq` gives (alpha = r, where PEFT's unscaled factors are right); the saved adapter is a
plain LoRA that PEFT loads over the same bitsandbytes base (as it loads any QLoRA adapter: the base is quantized
from the original weights at load, nothing of it is saved)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from peft.utils.loftq_utils import _low_rank_decomposition
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import peftkit
from peftkit.core.method import InitData
from peftkit.core.registry import get_method
from peftkit.errors import PeftkitError
from peftkit.io.quantize import keep_trainable_layout
from peftkit.methods.loftq import loftq
from peftkit.methods.qlora import QloraConfig
from tests.tiny import QUANT, logits, tiny_input, tiny_model

NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
           bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from transformers import AutoTokenizer

    from peftkit.io.models import embedded_folder

    folder = tmp_path_factory.mktemp("loftq") / "llama"
    model = tiny_model("llama", QUANT)
    with torch.no_grad():  # weights of a trained model's scale, so 4 bits lose visibly
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_folder()).save_pretrained(folder)
    return folder


def _loftq_model(base, init: str, r: int = 8, alpha: float | None = None):
    model, _ = peftkit.load_model(str(base), dtype="fp32", quantize="nf4")
    config = QloraConfig(r=r, lora_alpha=alpha, init=init, target_modules="all-linear")
    peftkit.inject(model, config)
    stored = load_file(str(base / "model.safetensors"))
    data = InitData(batches=lambda: iter(()), weight=lambda path: stored[f"{path}.weight"])
    get_method("qlora").initialise(model, config, "default", data)
    return model


def _errors(model, reference, ids) -> tuple[float, float]:
    """(mean |logit difference|, KL(reference || model) per token) against the full-precision model."""
    ours, theirs = logits(model, ids), logits(reference, ids)
    kl = torch.nn.functional.kl_div(ours.log_softmax(-1), theirs.log_softmax(-1), log_target=True, reduction="none")
    return (ours - theirs).abs().mean().item(), kl.sum(-1).mean().item()


def test_loftq_brings_the_quantized_model_closer_to_full_precision(base):
    full = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids = tiny_input(batch=4, length=12, size=QUANT)
    plain_abs, plain_kl = _errors(_loftq_model(base, "default", r=16), full, ids)  # B = 0: the quantized base
    loftq_abs, loftq_kl = _errors(_loftq_model(base, "loftq", r=16), full, ids)
    assert loftq_abs < 0.75 * plain_abs and loftq_kl < 0.5 * plain_kl  # measured: 0.59x and 0.35x


def test_loftq_matches_peft_and_saves_for_peft(base, tmp_path):
    """PEFT's replace_lora_weights_loftq computes on CUDA only, so its CPU part is compared: the rank-r split of
    (stored W - de-quantized W) it sets as (A, B) = (R, L)."""
    from bitsandbytes.functional import dequantize_4bit  # here: its import takes ~2 s in every worker

    ours = _loftq_model(base, "loftq", r=8, alpha=8)
    layer = ours.model.layers[1].mlp.down_proj
    stored = load_file(str(base / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"]
    error = stored - dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    theirs = _low_rank_decomposition(error, reduced_rank=8)
    assert torch.allclose(layer.lora_A["default"].weight, theirs["R"], atol=1e-5)
    assert torch.allclose(layer.lora_B["default"].weight, theirs["L"], atol=1e-5)
    ids = tiny_input(size=QUANT)
    peftkit.save_adapter(ours, tmp_path / "ad")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, quantization_config=BitsAndBytesConfig(**NF4)), tmp_path / "ad")
    keep_trainable_layout(loaded)
    assert (logits(loaded, ids) - logits(ours, ids)).abs().max() <= 1e-4


def test_more_iterations_lower_the_weight_error():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    steps = 0.25  # a coarse uniform quantizer stands in for NF4

    def quantize(x: torch.Tensor) -> torch.Tensor:
        return (x / steps).round() * steps

    errors = [(w - q - 2.0 * b @ a).norm().item() for q, a, b in (loftq(w, 8, 2.0, quantize, t) for t in (1, 4))]
    assert errors[1] < errors[0] < (w - quantize(w)).norm().item()


def test_loftq_needs_qlora_and_four_bits():
    with pytest.raises(PeftkitError, match="loftq needs a quantized base"):
        get_method("lora").build_config({"init": "loftq"})
    with pytest.raises(PeftkitError, match="needs a 4-bit base"):
        get_method("qlora").build_config({"init": "loftq", "bits": 8})
