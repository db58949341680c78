"""IA3 against HF PEFT 0.21.2: PEFT's defaults per model_type (the same modules, the same trainable count), each
loads the other's adapter with equal logits, merge equals merge_and_unload and unmerges; the options."""

import json

import pytest
import torch
from peft import IA3Config as PeftIA3Config
from peft import PeftModel, get_peft_model

import peftkit
from peftkit.core.counting import count_parameters
from peftkit.core.registry import get_method
from peftkit.errors import PeftkitError
from peftkit.memory import estimate_memory
from peftkit.methods.ia3 import IA3Config
from tests.methods.merge_checks import assert_merges_as_peft
from tests.tiny import ARCHS, logits, tiny_config, tiny_input, tiny_model


def trained_like(model: torch.nn.Module, seed: int = 3) -> None:
    """Move every IA3 vector away from ones, as training would (ones would hide a wrong axis or a lost tensor)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.3)


def ia3(kind: str, **options) -> torch.nn.Module:
    model = tiny_model(kind)
    peftkit.inject(model, IA3Config(**options))
    trained_like(model)
    return model


@pytest.mark.parametrize("kind", ARCHS)
def test_defaults_count_and_peft_loads_ours(tmp_path, kind):
    """PEFT's defaults for every architecture (gpt2: c_attn and mlp.c_proj, the latter scaling its input)."""
    model, ids = ia3(kind), tiny_input()
    ours = logits(model, ids)
    assert (ours - logits(tiny_model(kind), ids)).abs().max() > 1e-3
    peftkit.save_adapter(model, tmp_path / "ad")
    theirs = PeftModel.from_pretrained(tiny_model(kind), tmp_path / "ad")
    assert (logits(theirs, ids) - ours).abs().max() <= 1e-5
    fresh = get_peft_model(tiny_model(kind), PeftIA3Config(task_type="CAUSAL_LM"))
    shapes = {n.replace(".default", ""): p.shape for n, p in fresh.named_parameters() if p.requires_grad}
    mine = {f"base_model.model.{n}".replace(".default", ""): p.shape for n, p in model.named_parameters() if p.requires_grad}
    assert shapes == mine
    assert count_parameters(tiny_config(kind), "ia3") == fresh.get_nb_trainable_parameters()


@pytest.mark.parametrize("kind,options", [("llama", {}), ("gpt2", {}),
                                          ("qwen2", {"target_modules": ["q_proj", "up_proj", "down_proj"],
                                                     "feedforward_modules": ["up_proj", "down_proj"]})])
def test_loads_peft_saved_ia3(tmp_path, kind, options):
    ids = tiny_input()
    peft_model = get_peft_model(tiny_model(kind), PeftIA3Config(task_type="CAUSAL_LM", **options))
    trained_like(peft_model)
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    model = peftkit.load_adapter(tiny_model(kind), tmp_path / "peft")
    assert (logits(model, ids) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])  # biases IA3 scales on merge; Conv1D's [in, out] weights
def test_merge_equals_peft_merge_and_unload_and_unmerges(tmp_path, kind):
    assert_merges_as_peft(ia3(kind), kind, tmp_path / "ad")


def test_saved_config_names_modules_as_peft_does(tmp_path):
    peftkit.save_adapter(ia3("gpt2"), tmp_path / "ad")
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IA3" and saved["fan_in_fan_out"]
    assert saved["target_modules"] == ["c_attn", "mlp.c_proj"] and saved["feedforward_modules"] == ["mlp.c_proj"]


def test_options_and_refusals():
    method = get_method("ia3")
    config = method.build_config({"target_modules": "k_proj,down_proj", "feedforward_modules": "down_proj"})
    assert (config.target_modules, config.feedforward_modules) == (("k_proj", "down_proj"), ("down_proj",))
    for options, message in (({"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}, "not in target"),
                             ({"rank": 4}, "no option 'rank'")):
        with pytest.raises(PeftkitError, match=message) as err:
            method.build_config(options)
        assert "\n" not in str(err.value)
    with pytest.raises(PeftkitError, match="no default modules for model_type 'phi3'"):
        IA3Config().resolved("phi3")


def test_estimate_counts_what_inject_creates():
    config = tiny_config("llama")
    est = estimate_memory(config, "ia3", precision="fp32", seq_len=32)
    assert est.trainable_params == 2 * (16 + 16 + 64)  # k, v scale their output, down_proj its input
    lora = estimate_memory(config, "lora", precision="fp32", seq_len=32)
    assert est.breakdown["activations"] != lora.breakdown["activations"]
