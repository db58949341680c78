"""HF PEFT interop, both directions: PEFT loads peftkit's adapters and peftkit loads PEFT's, same logits."""

import json

import pytest
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

import peftkit
from peftkit import LoraConfig
from tests.tiny import logits, perturb_adapter, tiny_input, tiny_model

CASES = [
    ("llama", {"target_modules": ["q_proj", "v_proj"]}),
    ("llama", {"target_modules": "all-linear", "use_rslora": True}),
    ("qwen2", {"target_modules": ["q_proj", "k_proj", "v_proj"]}),
    ("gpt2", {"target_modules": ["c_attn", "c_proj"]}),
    ("llama", {"target_modules": ["q_proj"], "layers_to_transform": [1]}),
    ("qwen2", {"target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 3}}),
]


@pytest.mark.parametrize("kind,options", CASES)
def test_peft_loads_peftkit_adapter(tmp_path, kind, options):
    model, ids = tiny_model(kind), tiny_input()
    peftkit.inject(model, LoraConfig(r=4, lora_alpha=8, **options))
    perturb_adapter(model)
    ours = logits(model, ids)
    peftkit.save_adapter(model, tmp_path / "ad")
    theirs = PeftModel.from_pretrained(tiny_model(kind), tmp_path / "ad")
    assert (logits(theirs, ids) - ours).abs().max() <= 1e-5
    n_saved = len(peftkit.io.adapters.read_adapter(tmp_path / "ad")[1])
    n_peft = sum(1 for n, _ in theirs.named_parameters() if "lora_" in n)
    assert n_saved == n_peft  # PEFT created (and loaded) exactly the saved modules


@pytest.mark.parametrize("kind,targets", [("llama", ["q_proj", "v_proj"]), ("qwen2", ["q_proj", "k_proj", "v_proj", "o_proj"]), ("gpt2", ["c_attn"])])
def test_peftkit_loads_peft_adapter(tmp_path, kind, targets):
    ids = tiny_input()
    peft_model = get_peft_model(
        tiny_model(kind), PeftLoraConfig(r=4, lora_alpha=16, target_modules=targets, fan_in_fan_out=kind == "gpt2")
    )
    perturb_adapter(peft_model)
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    model = tiny_model(kind)
    peftkit.load_adapter(model, tmp_path / "peft")
    assert (logits(model, ids) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("kind,targets", [("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn", "c_fc"]), ("gemma", "all-linear")])
def test_trainable_counts_equal_peft(kind, targets):
    model = tiny_model(kind)
    peftkit.inject(model, LoraConfig(r=8, target_modules=targets))
    peft_model = get_peft_model(tiny_model(kind), PeftLoraConfig(r=8, target_modules=targets))
    assert peftkit.trainable_parameters(model) == peft_model.get_nb_trainable_parameters()


def test_saved_files_follow_peft_layout(tmp_path):
    model = tiny_model("llama")
    model.name_or_path = "org/tiny-llama"
    peftkit.inject(model, LoraConfig(r=4))
    peftkit.save_adapter(model, tmp_path / "ad", prompt_format={"plain_template": "{prompt}"})
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == "org/tiny-llama"
    assert config["target_modules"] == ["q_proj", "v_proj"]
    keys = peftkit.io.adapters.read_adapter(tmp_path / "ad")[1]
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert all(k.startswith("base_model.model.") for k in keys)
    meta = json.loads((tmp_path / "ad" / "peftkit.json").read_text())
    assert meta["prompt_format"] == {"plain_template": "{prompt}"} and meta["method"] == "lora"
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]  # no temporary folder left behind


def test_round_trip_and_mergekit_style_bias(tmp_path, caplog):
    """lora_B.bias saved without lora_bias (mergekit's habit): PEFT drops it, peftkit applies it."""
    model, ids = tiny_model("qwen2"), tiny_input()
    peftkit.inject(model, LoraConfig(r=4, lora_bias=True, target_modules=["q_proj", "v_proj"]))
    perturb_adapter(model)
    ours = logits(model, ids)
    peftkit.save_adapter(model, tmp_path / "ad")
    cfg_file = tmp_path / "ad" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["lora_bias"] = False
    cfg_file.write_text(json.dumps(cfg))
    fresh = tiny_model("qwen2")
    with caplog.at_level("WARNING", logger="peftkit"):
        peftkit.load_adapter(fresh, tmp_path / "ad")
    assert "lora_bias" in caplog.text
    assert (logits(fresh, ids) - ours).abs().max() <= 1e-6
