"""Streaming merge == in-memory merge == HF PEFT's merge_and_unload, on tiny checkpoints (single and sharded)."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import peftkit
from peftkit.merging.stream import merge_to_disk
from tests.merging.fixtures import load, max_param_diff, save_base, save_lora
from tests.tiny import logits, tiny_input, tiny_model

CASES = [  # (kind, shard size, LoRA config)
    ("llama", "20KB", {}),
    ("qwen2", None, {"target_modules": ["q_proj", "k_proj", "v_proj"], "lora_bias": True}),
    ("gpt2", None, {}),
    ("gemma", "20KB", {}),  # tied embeddings, all-linear leaves lm_head alone
]


@pytest.mark.parametrize("kind,shard,config", CASES, ids=[c[0] for c in CASES])
def test_streaming_equals_memory_equals_peft(tmp_path, kind, shard, config):
    base = save_base(kind, tmp_path / "base", shard)
    adapter = save_lora(kind, tmp_path / "adapter", **config)
    report = merge_to_disk(str(base), [str(adapter)], str(tmp_path / "merged"))
    assert report.worst_relative_error <= 1e-5 and report.changed > 0
    assert report.shards == len({*json.loads((base / "model.safetensors.index.json").read_text())["weight_map"].values()}) if shard else 1
    streamed = load(tmp_path / "merged")

    in_memory = peftkit.merge(peftkit.load_adapter(tiny_model(kind), adapter))
    peft_merged = PeftModel.from_pretrained(tiny_model(kind), str(adapter)).merge_and_unload()
    assert max_param_diff(streamed, in_memory) <= 1e-5
    assert max_param_diff(streamed, peft_merged) <= 1e-5
    assert max_param_diff(streamed, tiny_model(kind)) > 1e-3  # the merge changed something
    ids = tiny_input()
    assert (logits(streamed, ids) - logits(peft_merged, ids)).abs().max() <= 1e-5


def test_tied_lm_head_gets_its_own_tensor(tmp_path):
    base = save_base("gemma", tmp_path / "base")
    adapter = save_lora("gemma", tmp_path / "adapter", target_modules=["q_proj", "lm_head"])
    reference = logits(peftkit.load_adapter(tiny_model("gemma"), adapter), tiny_input())  # unmerged: E in, E+Δ out
    report = merge_to_disk(str(base), [str(adapter)], str(tmp_path / "merged"))
    assert report.untied_lm_head
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    merged = load(tmp_path / "merged")
    assert torch.equal(merged.model.embed_tokens.weight, tiny_model("gemma").model.embed_tokens.weight)
    assert (logits(merged, tiny_input()) - reference).abs().max() <= 1e-5


def test_bf16_output_is_rounded_once(tmp_path):
    base = save_base("llama", tmp_path / "base")
    adapter = save_lora("llama", tmp_path / "adapter")
    report = merge_to_disk(str(base), [str(adapter)], str(tmp_path / "merged"), dtype="bf16")
    assert report.tolerance < 0.02 and report.worst_relative_error <= report.tolerance
    merged = load(tmp_path / "merged")
    fp32 = peftkit.merge(peftkit.load_adapter(tiny_model("llama"), adapter))
    got, want = merged.model.layers[0].self_attn.q_proj.weight, fp32.model.layers[0].self_attn.q_proj.weight
    ulp = want.abs() * 2**-8  # one bf16 rounding of the fp32 sum (not two)
    assert ((got - want.to(torch.bfloat16).float()).abs() <= ulp + 1e-12).all()


def test_bf16_checkpoint_keeps_its_dtype_and_passes_the_self_check(tmp_path):
    tiny_model("llama").to(torch.bfloat16).save_pretrained(tmp_path / "base")
    adapter = save_lora("llama", tmp_path / "adapter")
    report = merge_to_disk(str(tmp_path / "base"), [str(adapter)], str(tmp_path / "merged"))
    assert report.tolerance > 1e-3 and report.worst_relative_error <= report.tolerance
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_self_check_catches_a_wrong_merge(tmp_path, monkeypatch):
    import peftkit.merging.stream as ms

    base = save_base("llama", tmp_path / "base")
    adapter = save_lora("llama", tmp_path / "adapter")
    real = ms._apply
    monkeypatch.setattr(ms, "_apply", lambda t, w, d, s: (lambda m, p: (m * 1.001, p))(*real(t, w, d, s)))
    with pytest.raises(peftkit.PeftkitError, match="self-check failed"):
        merge_to_disk(str(base), [str(adapter)], str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()
