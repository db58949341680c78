"""VeRA against HF PEFT 0.21.2: the same projections from the same key, the same trainable count, each loads the
other's adapter with equal logits, merge equals merge_and_unload; the refusals where PEFT fails; the options."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft import VeraConfig as PeftVeraConfig
from safetensors.torch import load_file

import peftkit
from peftkit.core.counting import count_parameters
from peftkit.core.registry import get_method
from peftkit.errors import PeftkitError
from peftkit.memory import estimate_memory
from peftkit.methods.vera import VeraConfig
from tests.methods.merge_checks import assert_merges_as_peft
from tests.tiny import logits, perturb_adapter, tiny_config, tiny_input, tiny_model

# targets of different shapes (sliced projections), Conv1D, GQA, biases, defaults, all-linear
CASES = [("llama", ["q_proj", "v_proj", "down_proj"]), ("qwen2", None), ("gpt2", ["c_attn", "c_proj"]),
         ("mistral", "all-linear"), ("gemma", ["q_proj", "o_proj"])]


def vera(kind, targets, **kw):
    model = tiny_model(kind)
    peftkit.inject(model, VeraConfig(r=4, target_modules=targets, **kw))
    perturb_adapter(model, scale=0.5)  # λ_b = 0 at init would hide a wrong projection or axis
    return model


def peft_vera(kind, targets, **kw):
    config = PeftVeraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM", **kw)
    return get_peft_model(tiny_model(kind), config)


@pytest.mark.parametrize("kind,targets", CASES)
def test_peft_loads_ours_with_its_own_projections_and_count(tmp_path, kind, targets):
    model, ids = vera(kind, targets), tiny_input()
    ours = logits(model, ids)
    assert (ours - logits(tiny_model(kind), ids)).abs().max() > 1e-3  # the adapter does something
    peftkit.save_adapter(model, tmp_path / "ad")
    theirs = PeftModel.from_pretrained(tiny_model(kind), tmp_path / "ad")
    assert (logits(theirs, ids) - ours).abs().max() <= 1e-5
    fresh = peft_vera(kind, targets)  # PEFT's own draw from key 0 equals ours
    saved = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert torch.equal(saved["base_model.vera_A"], fresh.base_model.vera_A["default"])
    assert torch.equal(saved["base_model.vera_B"], fresh.base_model.vera_B["default"])
    counted = count_parameters(tiny_config(kind), "vera", r=4, target_modules=targets)
    assert counted == peftkit.trainable_parameters(tiny_model_with(kind, targets)) == fresh.get_nb_trainable_parameters()


def tiny_model_with(kind, targets):
    model = tiny_model(kind)
    peftkit.inject(model, VeraConfig(r=4, target_modules=targets))
    return model


@pytest.mark.parametrize("kind,targets,save_projection", [("llama", ["q_proj", "down_proj"], True),
                                                          ("gpt2", ["c_attn", "c_fc"], False)])
def test_loads_peft_saved_vera(tmp_path, kind, targets, save_projection):
    ids = tiny_input()
    peft_model = peft_vera(kind, targets, save_projection=save_projection, projection_prng_key=7)
    perturb_adapter(peft_model, scale=0.5)
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    model = peftkit.load_adapter(tiny_model(kind), tmp_path / "peft")
    assert (logits(model, ids) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_merge_equals_peft_merge_and_unload_and_unmerges(tmp_path, kind):
    targets = ["q_proj", "v_proj", "down_proj"] if kind == "qwen2" else ["c_attn", "c_proj"]
    assert_merges_as_peft(vera(kind, targets), kind, tmp_path / "ad")


@pytest.mark.parametrize("second,message", [
    (dict(projection_prng_key=1), "projection_prng_key must be 0"),
    (dict(save_projection=False), "save_projection must be True"),
    (dict(r=8), "r must be 4"),
    (dict(target_modules=["down_proj"]), "at least 64 x 32"),  # larger input than the first adapter's q_proj
])
def test_second_adapter_must_fit_the_shared_projections(second, message):
    model = tiny_model("llama")
    peftkit.inject(model, VeraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(PeftkitError, match=message) as err:
        peftkit.inject(model, VeraConfig(**{"r": 4, "target_modules": ["q_proj"], **second}), "other")
    assert "\n" not in str(err.value)


def test_second_adapter_shares_the_projections_and_switches():
    model, ids = vera("llama", ["q_proj", "down_proj"]), tiny_input()
    first = logits(model, ids)
    peftkit.inject(model, VeraConfig(r=4, target_modules=["q_proj"]), "small")
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.projections is model.model.layers[1].mlp.down_proj.projections
    peftkit.set_adapter(model, "default")
    assert torch.equal(logits(model, ids), first)


def test_file_without_its_projections_is_refused(tmp_path):
    peftkit.save_adapter(vera("llama", ["q_proj"]), tmp_path / "ad")
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v for k, v in load_file(weights).items() if "vera_A" not in k}, weights)
    with pytest.raises(PeftkitError, match="lacks base_model.vera_A") as err:
        peftkit.load_adapter(tiny_model("llama"), tmp_path / "ad")
    assert "\n" not in str(err.value)


def test_options_as_peft_names_them_and_config_json(tmp_path):
    method = get_method("vera")
    config = method.build_config({"rank": 8, "dropout": "0.1", "projection_prng_key": "3", "d_initial": "0.5",
                                  "save_projection": "false", "target_modules": "q_proj,v_proj"})
    assert (config.r, config.vera_dropout, config.projection_prng_key, config.d_initial, config.save_projection,
            config.target_modules) == (8, 0.1, 3, 0.5, False, ("q_proj", "v_proj"))
    assert method.canonical_key("vera_dropout") == "dropout" and method.canonical_key("r") == "rank"
    for bad, message in (({"d_initial": "x"}, "d_initial"), ({"projection_prng_key": -1}, "projection_prng_key"),
                         ({"r": 0}, "rank")):
        with pytest.raises(PeftkitError, match=message):
            method.build_config(bad)
    model = tiny_model("llama")
    peftkit.inject(model, VeraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[1], save_projection=False))
    peftkit.save_adapter(model, tmp_path / "ad")
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "VERA" and saved["target_modules"] == "^(model\\.layers\\.1\\.self_attn\\.q_proj)$"
    assert not saved["save_projection"] and len(load_file(tmp_path / "ad" / "adapter_model.safetensors")) == 2


def test_estimate_counts_and_its_own_activations():
    config = tiny_config("llama")
    est = estimate_memory(config, "vera", precision="fp32", seq_len=32, r=4)
    assert est.trainable_params == 2 * ((32 + 4) + (16 + 4))  # default q_proj, v_proj: d_out + r each
    lora = estimate_memory(config, "lora", precision="fp32", seq_len=32, r=4)
    assert est.breakdown["activations"] != lora.breakdown["activations"]


def test_learning_rates_bundled_task_and_user_data():
    """VeRA's vectors barely move at the bundled task's 2e-3: its own bundled_lr there, its default_lr on user data."""
    from peftkit.train.config import load_train_config, resolve_defaults

    method = get_method("vera")
    assert resolve_defaults(load_train_config(None, {"method": "vera"})).lr == method.bundled_lr
    assert resolve_defaults(load_train_config(None, {"method": "vera", "data": "rows.jsonl"})).lr == method.default_lr
    assert resolve_defaults(load_train_config(None, {"method": "vera", "lr": 1e-3})).lr == 1e-3
