"""QLoRA: LoRA over a bitsandbytes-quantized base, on CPU (bitsandbytes >= 0.48).

The saved adapter is a plain PEFT LoRA adapter that HF PEFT loads over the same bitsandbytes base with equal
logits; its peftkit.json records the quantization; the trainer trains it (with gradient checkpointing too); the
options are checked; what cannot work on a quantized base is refused with one clear line.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import peftkit
from peftkit.errors import PeftkitError
from peftkit.io.quantize import keep_trainable_layout
from peftkit.methods.qlora import QloraConfig
from tests.tiny import QUANT, logits, perturb_adapter, tiny_input, tiny_model, train_steps

BNB = {"nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                   bnb_4bit_compute_dtype=torch.float32),
       "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                   bnb_4bit_compute_dtype=torch.float32),
       "int8": dict(load_in_8bit=True)}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from transformers import AutoTokenizer

    from peftkit.io.models import embedded_folder

    folder = tmp_path_factory.mktemp("qbase") / "llama"
    tiny_model("llama", QUANT).save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_folder()).save_pretrained(folder)  # load_model loads one (unused here)
    return folder


def _quantized(base, quantize: str):
    model, _ = peftkit.load_model(str(base), dtype="fp32", quantize=quantize, double_quant=quantize == "nf4")
    return model


@pytest.mark.parametrize("quantize,layer", [("nf4", "Linear4bit"), ("fp4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_load_model_quantizes_linears(base, quantize, layer):
    import bitsandbytes as bnb  # here, not at collection: its import takes ~2 s in every worker

    layer = getattr(bnb.nn, layer)
    model = _quantized(base, quantize)
    assert isinstance(model.model.layers[0].self_attn.q_proj, layer)
    assert isinstance(model.model.layers[1].mlp.down_proj, layer)
    assert type(model.lm_head) is torch.nn.Linear  # transformers keeps the output embedding in full precision
    plain = tiny_model("llama", QUANT)
    ids = tiny_input(size=QUANT)
    diff = (logits(model, ids) - logits(plain, ids)).abs().max()
    assert 0 < diff < 0.5  # quantized: close to the original, not equal


def test_unknown_quantization_is_refused(base):
    with pytest.raises(PeftkitError, match="unknown quantization 'nf3'; use one of nf4, fp4, int8"):
        peftkit.load_model(str(base), quantize="nf3")


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_peft_loads_qlora_adapter_over_bnb_base(base, tmp_path, quantize):
    import bitsandbytes as bnb

    model = _quantized(base, quantize)
    peftkit.inject(model, QloraConfig(r=4, target_modules="all-linear", bits=8 if quantize == "int8" else 4))
    perturb_adapter(model)  # B = 0 would hide a wrong adapter
    ids = tiny_input(size=QUANT)
    ours = logits(model, ids)
    peftkit.save_adapter(model, tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    theirs = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32,
                                             quantization_config=BitsAndBytesConfig(**BNB[quantize])), tmp_path / "ad")
    assert isinstance(theirs.base_model.model.model.layers[0].self_attn.q_proj.base_layer,
                      bnb.nn.Linear4bit if quantize == "nf4" else bnb.nn.Linear8bitLt)
    keep_trainable_layout(theirs)  # the same 4-bit kernel on both sides (else bitsandbytes' bf16 CPU eval kernel)
    assert (logits(theirs, ids) - ours).abs().max() <= 1e-4
    # and back: peftkit loads the adapter over the same quantized base, same logits
    again = _quantized(base, quantize)
    peftkit.load_adapter(again, tmp_path / "ad")
    assert (logits(again, ids) - ours).abs().max() <= 1e-5


def test_peftkit_json_records_the_quantization(base, tmp_path):
    model, _ = peftkit.load_model(str(base), dtype="fp32", quantize="fp4", double_quant=False, compute_dtype="bf16")
    peftkit.inject(model, QloraConfig(r=2, quant_type="fp4", double_quant=False, compute_dtype="bf16"))
    peftkit.save_adapter(model, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / "peftkit.json").read_text())
    assert meta["method"] == "qlora"
    q = meta["quantization"]
    assert (q["bits"], q["quant_type"], q["double_quant"], q["compute_dtype"], q["dtype"], q["blocksize"]) == \
        (4, "fp4", False, "bfloat16", "float32", 64)
    assert q["modules_not_quantized"] == ["lm_head"]


def test_plain_lora_adapter_records_no_quantization(tmp_path):
    model = tiny_model("llama", QUANT)
    peftkit.inject(model, peftkit.LoraConfig(r=2))
    peftkit.save_adapter(model, tmp_path / "ad")
    assert "quantization" not in json.loads((tmp_path / "ad" / "peftkit.json").read_text())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_qlora_trains_with_and_without_checkpointing(base, checkpointing):
    from peftkit.core.archs import enable_checkpointing

    model = _quantized(base, "nf4")
    peftkit.inject(model, QloraConfig(r=4))
    if checkpointing:
        enable_checkpointing(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    logits(model, tiny_input(size=QUANT))  # an eval forward first, as the trainer's evaluation does (see keep_trainable_layout)
    first, last = train_steps(model, tiny_input(size=QUANT, length=12), steps=6)
    assert last < first
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n for n in trained)
    assert all(p.dtype == torch.float32 for p in trained.values())  # fp32 adapter over the 4-bit base
    assert all(p.abs().sum() > 0 for n, p in trained.items() if "lora_B" in n)  # every B got gradients
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # the base is untouched


def test_in_memory_merge_of_quantized_base_is_refused(base):
    model = _quantized(base, "nf4")
    peftkit.inject(model, QloraConfig(r=2))
    with pytest.raises(PeftkitError, match="cannot merge into a quantized .*run `peftkit merge`"):
        peftkit.merge(model)


def test_fsdp_on_cpu_is_refused(base, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(PeftkitError, match="QLoRA under FSDP needs CUDA GPUs .*bnb_4bit_quant_storage"):
        peftkit.load_model(str(base), quantize="nf4")


@pytest.mark.parametrize("options,message", [
    ({"bits": 3}, "qlora bits must be 4 .* or 8, got 3"),
    ({"quant_type": "int4"}, "quant_type must be one of nf4, fp4, got 'int4'"),
    ({"compute_dtype": "fp8"}, "compute_dtype must be one of auto, fp32, bf16, fp16"),
    ({"init": "pissa"}, "qlora cannot use init=pissa"),
    ({"use_dora": True}, "qlora cannot use use_dora"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(PeftkitError, match=message):
        peftkit.core.registry.get_method("qlora").build_config(options)


def test_load_options_tell_the_loader_what_base(base):
    method = peftkit.core.registry.get_method("qlora")
    assert method.load_options(method.build_config({"rank": 4})) == \
        {"quantize": "nf4", "double_quant": True, "compute_dtype": None}
    assert method.load_options(method.build_config({"set": None, "bits": "8"}))["quantize"] == "int8"
    assert peftkit.core.registry.get_method("lora").load_options(None) == {}
