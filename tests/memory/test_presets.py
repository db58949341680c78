"""Presets equal the released models' parameter counts; config resolution and its errors."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from peftkit.errors import PeftkitError
from peftkit.memory.presets import PRESETS, resolve_config
from peftkit.memory.shapes import model_shape

# Parameter counts of the released checkpoints (model cards / safetensors index metadata).
PUBLISHED = {
    "qwen1.5-7b": 7_721_324_544,
    "qwen1.5-72b": 72_287_920_128,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-72b": 72_706_203_648,
    "llama-2-7b": 6_738_415_616,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "smollm2-135m": 134_515_008,
    # mixture-of-experts (the cards round them to 6.9B and 30.5B)
    "olmoe-1b-7b": 6_919_161_856,
    "qwen3-30b-a3b": 30_532_122_624,
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count_equals_release(name):
    config, _ = resolve_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    built = sum(p.numel() for p in model.parameters())  # tied weights are one Parameter
    assert built == PUBLISHED[name]
    assert model_shape(config).total_params == built


def test_names_are_case_insensitive():
    assert resolve_config("Qwen1.5-7B")[0].hidden_size == resolve_config("qwen1.5-7b")[0].hidden_size == 4096


def test_config_json_file_and_folder(tmp_path):
    fields = PRESETS["llama-2-7b"][1]
    (tmp_path / "config.json").write_text(json.dumps(fields))
    for source in (tmp_path, tmp_path / "config.json"):
        assert model_shape(resolve_config(str(source))[0]).total_params == PUBLISHED["llama-2-7b"]


def test_config_missing_fields_are_named(tmp_path):
    fields = {k: v for k, v in PRESETS["llama-2-7b"][1].items() if k not in ("hidden_size", "vocab_size")}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(fields))
    with pytest.raises(PeftkitError, match="hidden_size, vocab_size"):
        resolve_config(str(path))


def test_unknown_preset_lists_presets():
    with pytest.raises(PeftkitError, match="qwen1.5-72b") as err:
        resolve_config("qwen9-1t")
    assert "\n" not in str(err.value)


def test_uncached_hub_id_is_a_clear_offline_error():
    with pytest.raises(PeftkitError, match="does not download"):
        resolve_config("nobody-here/not-a-model-xyz")


@pytest.mark.parametrize(
    "preset, method, options",
    [
        ("llama-2-7b", "lora", {"r": 8}),
        ("qwen2.5-7b", "lora", {"r": 16, "target_modules": "all-linear"}),
        ("qwen1.5-7b", "adapter", {"variant": "houlsby", "reduction_factor": 16}),
        ("mistral-7b", "adapter", {"variant": "pfeiffer", "reduction_factor": 32}),
        ("llama-3-8b", "prefix", {"num_virtual_tokens": 20}),
        ("qwen2.5-7b", "prompt", {"num_virtual_tokens": 30}),
    ],
)
def test_method_formulas_equal_registered_methods(preset, method, options):
    """The textbook formulas below (LoRA r(d_in+d_out), adapters 2hm+m+h, prefix P·L·2·kv_dim, prompt P·h) agree with
    what the registered method code creates on the meta device: each keeps the other honest."""
    from peftkit.core.counting import trainable_parameters
    from peftkit.memory.building import build_meta_model
    from peftkit.memory.training_setup import TrainingSetup

    config, _ = resolve_config(preset)
    setup = TrainingSetup(method, "bf16", method_options=options)
    registered, _ = trainable_parameters(build_meta_model(config, setup))
    assert analytic_trainable(model_shape(config), setup) == registered > 0


def analytic_trainable(shape, setup) -> int:
    """Trainable parameters from the methods' textbook formulas (the oracle the registered code is checked against):

        freeze   N * (parameters of one decoder layer)              (the last N layers train)
        lora     L * sum over targets of r * (d_in + d_out)         (Hu et al. 2021; A is r x d_in, B is d_out x r)
        adapter  per adapter 2*h*m + m + h, m = h // reduction_factor (Houlsby et al. 2019); houlsby: 2 per layer,
                 pfeiffer / parallel: 1 per layer
        prefix   P * L * 2 * n_kv * d                                (Li & Liang 2021; K and V per layer, GQA-aware)
        prompt   P * h                                               (Lester et al. 2021; one embedding per token)
    """
    from peftkit.memory.activations import lora_targets

    if setup.method == "freeze":
        return setup.option("layers", 2) * shape.layer_params
    if setup.method in ("lora", "qlora"):
        r = setup.option("r", 8)
        return shape.layers * sum(r * (shape.linear(t).d_in + shape.linear(t).d_out) for t in lora_targets(shape, setup))
    if setup.method == "adapter":
        m = shape.hidden // setup.option("reduction_factor", 16)
        count = 2 if setup.option("variant", "houlsby") == "houlsby" else 1
        return shape.layers * count * (2 * shape.hidden * m + m + shape.hidden)
    if setup.method == "prefix":
        return setup.option("num_virtual_tokens", 20) * shape.layers * 2 * shape.kv_dim
    assert setup.method == "prompt", setup.method
    return setup.option("num_virtual_tokens", 20) * shape.hidden
