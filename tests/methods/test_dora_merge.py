"""Merging DoRA exactly: merge_adapter / unmerge_adapter / merge in memory, the streaming `peftkit merge`, and PEFT's
merge_and_unload agree; combinations and weights, which have no DoRA meaning, are refused with the reason."""

import pytest
import torch
from peft import PeftModel

import peftkit
from peftkit.errors import PeftkitError
from peftkit.merging.deltas import combine, read_lora
from peftkit.merging.stream import merge_to_disk
from tests.merging.fixtures import load, max_param_diff, save_base, save_lora
from tests.methods.dora_helpers import dora_model, save_dora
from tests.tiny import logits, tiny_input, tiny_model

KINDS = ["llama", "qwen2", "gpt2"]


def _base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("kind", KINDS)
def test_merge_unmerge_in_memory(kind):
    model, ids = dora_model(kind), tiny_input()
    unmerged = logits(model, ids)
    before = _base_weights(model)
    peftkit.merge_adapter(model)
    assert (logits(model, ids) - unmerged).abs().max() <= 1e-5
    changed = _base_weights(model)
    assert max(float((changed[n] - before[n]).abs().max()) for n in before) > 1e-3
    peftkit.unmerge_adapter(model)
    after = _base_weights(model)
    assert max(float((after[n] - before[n]).abs().max()) for n in before) <= 1e-6
    assert (logits(model, ids) - unmerged).abs().max() <= 1e-5  # unmerged forward again (cache refreshed)
    merged = peftkit.merge(model)
    assert (logits(merged, ids) - unmerged).abs().max() <= 1e-5
    assert not any("lora_" in n for n, _ in merged.named_parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_merge_equals_memory_and_peft(tmp_path, kind):
    base = save_base(kind, tmp_path / "base", "20KB" if kind == "llama" else None)
    adapter = save_dora(kind, tmp_path / "adapter")
    report = merge_to_disk(str(base), [str(adapter)], str(tmp_path / "merged"))
    assert report.worst_relative_error <= 1e-5 and report.changed > 0
    streamed = load(tmp_path / "merged")
    in_memory = peftkit.merge(peftkit.load_adapter(tiny_model(kind), adapter))
    peft_merged = PeftModel.from_pretrained(tiny_model(kind), str(adapter)).merge_and_unload()
    assert max_param_diff(streamed, in_memory) <= 1e-5
    assert max_param_diff(streamed, peft_merged) <= 1e-5
    ids = tiny_input()
    unmerged = logits(peftkit.load_adapter(tiny_model(kind), adapter), ids)
    assert (logits(streamed, ids) - unmerged).abs().max() <= 1e-5


def test_folding_dora_with_another_adapter_is_refused():
    model = dora_model("llama")
    peftkit.inject(model, peftkit.LoraConfig(r=2, target_modules=["q_proj"]), name="other")
    with pytest.raises(PeftkitError, match="cannot fold DoRA adapter 'default' together with"):
        peftkit.merge(model)
    merged = peftkit.merge(model, names=["default"])  # alone it merges
    assert not any("lora_" in n for n, _ in merged.named_parameters())


def test_combinations_and_weights_of_dora_are_refused(tmp_path):
    dora = save_dora("llama", tmp_path / "dora")
    plain = save_lora("llama", tmp_path / "plain", target_modules=["q_proj", "v_proj"])
    for parts, how in (([dora, plain], "concat"), ([dora, save_dora("llama", tmp_path / "d2", seed=5)], "linear"),
                       ([dora], "svd")):
        with pytest.raises(PeftkitError, match="is DoRA: it rescales each row of W \\+ ΔW"):
            combine([read_lora(p) for p in parts], how, rank=2)
    with pytest.raises(PeftkitError, match="is DoRA, whose merged weight .* give it weight 1"):
        read_lora(dora, 0.5)
    with pytest.raises(PeftkitError, match="is DoRA"):
        merge_to_disk(str(save_base("llama", tmp_path / "base")), [str(dora), str(plain)], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
