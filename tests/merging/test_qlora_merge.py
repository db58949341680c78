"""`peftkit merge` of a QLoRA adapter: by default into the de-quantized base it was trained over (equal to PEFT's
de-quantized weight + PEFT's delta, tensor by tensor, and to PEFT's bitsandbytes model with the adapter, logit by
logit); `--merge-base original` into the unquantized weights (equal to a plain LoRA merge); the CLI prints the
merge base and the logit difference between the two on a probe."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from peft.utils.integrations import dequantize_bnb_weight
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

import peftkit
from peftkit.cli import main
from peftkit.errors import PeftkitError
from peftkit.io.models import embedded_folder
from peftkit.io.quantize import dequantized, keep_trainable_layout, quantization_record
from peftkit.merging.deltas import combine, read_lora, write_lora
from peftkit.merging.stream import merge_to_disk
from peftkit.methods.qlora import QloraConfig
from tests.tiny import QUANT, logits, perturb_adapter, tiny_input, tiny_model

NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def qlora(tmp_path_factory):
    """(base folder, QLoRA adapter on q_proj / v_proj trained over the NF4 base: random A and B)."""
    root = tmp_path_factory.mktemp("qmerge")
    tiny_model("llama", QUANT).save_pretrained(root / "base")
    AutoTokenizer.from_pretrained(embedded_folder()).save_pretrained(root / "base")
    model, _ = peftkit.load_model(str(root / "base"), dtype="fp32", quantize="nf4")
    peftkit.inject(model, QloraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb_adapter(model)
    peftkit.save_adapter(model, root / "adapter")
    return root / "base", root / "adapter"


def _peft_model(base, adapter):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32,
                                                                           quantization_config=NF4), adapter)
    keep_trainable_layout(model)  # bitsandbytes' bf16 CPU eval kernel would differ from the dense merge by ~1e-3
    return model.eval()


def test_merge_into_dequantized_base_equals_peft(qlora, tmp_path):
    base, adapter = qlora
    report = merge_to_disk(str(base), [str(adapter)], str(tmp_path / "merged"))
    assert report.merge_base == "quantized" and report.quantization["quant_type"] == "nf4"
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    peft_model = _peft_model(base, adapter)
    checked = 0
    for name, module in peft_model.base_model.model.named_modules():
        layer = getattr(module, "base_layer", module)
        if type(layer).__name__ != "Linear4bit" or name.endswith(".base_layer"):  # a LoRA layer's base: seen with it
            continue
        expected = dequantize_bnb_weight(layer.weight, state=layer.weight.quant_state).float()
        if hasattr(module, "get_delta_weight"):  # a LoRA layer: PEFT's own delta
            expected = expected + module.get_delta_weight("default").float()
        key = name + ".weight"
        assert (merged[key] - expected).abs().max() <= 1e-6, key
        checked += 1
    assert checked == 14  # 7 linears x 2 layers: adapted or not, every quantized weight is de-quantized
    ids = tiny_input(size=QUANT)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert (logits(dense, ids) - logits(peft_model, ids)).abs().max() <= 1e-4


def test_merge_base_original_is_a_plain_lora_merge(qlora, tmp_path):
    base, adapter = qlora
    report = merge_to_disk(str(base), [str(adapter)], str(tmp_path / "merged"), merge_base="original")
    assert report.merge_base == "original"
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peftkit.load_adapter(model, adapter)
    expected = peftkit.merge(model).state_dict()
    assert all((merged[k] - expected[k]).abs().max() <= 1e-6 for k in merged)


def test_cli_prints_merge_base_and_probe_difference(qlora, tmp_path, capsys):
    base, adapter = qlora
    main(["merge", "--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "m"), "--check-logits"])
    out = capsys.readouterr().out
    assert "merge base: quantized (the adapter was trained over a 4-bit nf4 double-quant base; " in out
    probe = float(out.split("between merging into the de-quantized and the original base: ")[1].split()[0])
    assert 0 < probe < 1  # the two bases differ, a little
    check = float(out.split("max |logit difference| vs base + adapter unmerged: ")[1].split()[0])
    assert check <= 1e-4  # --check-logits compares with the de-quantized base + adapter


def test_quantized_merge_base_of_plain_lora_is_refused(qlora, tmp_path):
    base, _ = qlora
    model = tiny_model("llama", QUANT)
    peftkit.inject(model, peftkit.LoraConfig(r=2))
    peftkit.save_adapter(model, tmp_path / "plain")
    with pytest.raises(PeftkitError, match="--merge-base quantized needs a QLoRA adapter"):
        merge_to_disk(str(base), [str(tmp_path / "plain")], str(tmp_path / "m"), merge_base="quantized")
    with pytest.raises(PeftkitError, match="--merge-base must be one of quantized, original, got 'nf4'"):
        merge_to_disk(str(base), [str(tmp_path / "plain")], str(tmp_path / "m"), merge_base="nf4")


@pytest.mark.parametrize("quantize", ["fp4", "int8"])
def test_dequantized_weight_is_what_bitsandbytes_loaded(qlora, quantize):
    """The merge's re-quantization reproduces, from the original weight, what transformers + bitsandbytes loaded
    (FP4 without double quantization, and 8-bit; NF4 is covered above through PEFT)."""
    base, _ = qlora
    model, _ = peftkit.load_model(str(base), dtype="fp32", quantize=quantize, double_quant=False)
    record = quantization_record(model)
    original = load_file(str(base / "model.safetensors"))
    for key in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        layer = model.get_submodule(key)
        expected = dequantize_bnb_weight(layer.weight, state=getattr(layer, "state", None)).float()
        assert (dequantized(original[key + ".weight"], record) - expected).abs().max() <= 1e-6, key


def test_combined_adapter_keeps_a_shared_quantization(qlora, tmp_path):
    base, adapter = qlora
    plain = tiny_model("llama", QUANT)
    peftkit.inject(plain, peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    peftkit.save_adapter(plain, tmp_path / "plain")
    write_lora(combine([read_lora(adapter, 0.5), read_lora(adapter, 0.5)]), tmp_path / "both")
    write_lora(combine([read_lora(adapter), read_lora(tmp_path / "plain")]), tmp_path / "mixed")
    recorded = json.loads((adapter / "peftkit.json").read_text())["quantization"]
    assert json.loads((tmp_path / "both" / "peftkit.json").read_text())["quantization"] == recorded
    assert "quantization" not in json.loads((tmp_path / "mixed" / "peftkit.json").read_text())
