"""Sharding plumbing without launching processes: DeepSpeed configs, recipe spellings, the refusal to save a partial
tensor, the parameter swap used for saving, and the per-process memory figure."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.train.config import load_train_config
from peftkit.train.devices.sharding import check_complete, deepspeed_config, deepspeed_plugin, full_parameters
from peftkit.train.options.recipe_keys import translate
from tests.tiny import tiny_model


def test_deepspeed_presets_carry_the_run_options():
    config = deepspeed_config("zero3", batch_size=4, grad_accum=8, max_grad_norm=0.5, precision="amp")
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True  # the saved result is whole
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["gradient_clipping"], config["bf16"]) == (4, 8, 0.5, {"enabled": True})
    zero2 = deepspeed_config("zero2", precision="fp32")
    assert zero2["zero_optimization"]["stage"] == 2 and "bf16" not in zero2


def test_deepspeed_json_keeps_its_values_and_fills_auto(tmp_path):
    file = tmp_path / "ds_z3.json"
    file.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False},
                                "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                                "gradient_accumulation_steps": 2, "fp16": {"enabled": "auto"}}))
    config = deepspeed_config(str(file), batch_size=3, grad_accum=5, precision="amp")
    assert config["train_micro_batch_size_per_gpu"] == 3 and config["gradient_accumulation_steps"] == 2
    assert "train_batch_size" not in config and "bf16" not in config  # the file chose fp16
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is False


@pytest.mark.parametrize(("value", "says"), [("zero4", "zero1, zero2, zero3"), ("missing.json", "no such file")])
def test_bad_deepspeed_values_are_refused_before_loading(value, says):
    with pytest.raises(PeftkitError, match=says):
        load_train_config(None, {"deepspeed": value})
    with pytest.raises(PeftkitError, match="pick one"):
        load_train_config(None, {"deepspeed": "zero3", "fsdp": True})


def test_deepspeed_needs_a_gpu_and_says_so():
    with pytest.raises(PeftkitError, match="--fsdp"):
        deepspeed_plugin("zero3", cpu=True)


@pytest.mark.parametrize(("options", "says"), [({"grad_accum": 2}, "grad-accum"), ({"save_steps": 5}, "pickles")])
def test_what_the_loop_does_not_do_under_deepspeed_is_refused(options, says):
    from peftkit.train.devices.sharding import check_deepspeed_run

    check_deepspeed_run(load_train_config(None, {"deepspeed": "zero2"}))
    with pytest.raises(PeftkitError, match=says):
        check_deepspeed_run(load_train_config(None, {"deepspeed": "zero2", **options}))


def test_use_vllm_refuses_deepspeed_as_it_refuses_fsdp():
    with pytest.raises(PeftkitError, match="--use-vllm with --deepspeed: every process would write and load"):
        load_train_config(None, {"objective": "grpo", "use_vllm": True, "deepspeed": "zero2"})


def test_zero3_partitioned_parameters_count_their_whole_size():
    from peftkit.core.counting import trainable_parameters

    model = nn.Linear(4, 3)
    model.weight.requires_grad_(False)
    model.weight.data = torch.empty(0)  # what a ZeRO-3 partition holds locally; DeepSpeed records the whole size
    model.weight.ds_numel = 12
    assert trainable_parameters(model) == (3, 15)


def test_recipe_spellings_of_other_tools():
    valid = ["fsdp", "deepspeed"]
    assert translate({"fsdp": "full_shard auto_wrap"}, valid, "r") == {"fsdp": True}  # TrainingArguments
    assert translate({"fsdp": ["full_shard", "auto_wrap"]}, valid, "r") == {"fsdp": True}  # axolotl
    assert translate({"deepspeed": "deepspeed_configs/zero3.json"}, valid, "r")["deepspeed"].endswith("zero3.json")
    with pytest.raises(PeftkitError, match="full shard"):
        translate({"fsdp": "shard_grad_op"}, valid, "r")
    with pytest.raises(PeftkitError, match="fsdp: true"):
        translate({"fsdp_config": {"fsdp_version": 2}}, valid + ["model"], "r")


def test_a_partial_or_empty_gather_is_refused():
    shapes = {"a.lora_B.weight": torch.Size([32, 4])}
    check_complete({"a.lora_B.weight": torch.zeros(32, 4)}, shapes, "the adapter")
    for bad in (torch.zeros(16, 4), torch.zeros(0), torch.zeros(128)):  # one rank's half, ZeRO-3's empty, 1-D
        with pytest.raises(PeftkitError, match="nothing was written"):
            check_complete({"a.lora_B.weight": bad}, shapes, "the adapter")
    with pytest.raises(PeftkitError, match="lacks"):
        check_complete({}, shapes, "the adapter")


def test_full_parameters_swaps_in_and_restores_keeping_ties():
    model = tiny_model("gemma")  # tied input / output embeddings
    embed = model.get_input_embeddings().weight
    whole = torch.full_like(embed, 0.5)
    with full_parameters(model, {"model.embed_tokens.weight": whole}) as inside:
        assert inside.get_input_embeddings().weight is inside.get_output_embeddings().weight
        assert float(inside.get_output_embeddings().weight.detach()[0, 0]) == 0.5
    assert model.get_input_embeddings().weight is embed and model.get_output_embeddings().weight is embed
    assert isinstance(model.get_input_embeddings().weight, nn.Parameter)


def test_memory_line_is_per_process_and_sharded(tmp_path):
    from peftkit.train.reporting.memory_report import memory_estimate
    from tests.tiny import save_tiny_checkpoint

    cfg = load_train_config(None, {"model": str(save_tiny_checkpoint(tmp_path / "tiny")), "method": "full",
                                   "batch_size": 1, "max_length": 64, "precision": "fp32", "fsdp": True})
    model = tiny_model("llama")
    one, two = memory_estimate(cfg, model.config, "fp32", 1), memory_estimate(cfg, model.config, "fp32", 2)
    assert two.setup["gpus"] == 2 and two.setup["fsdp"] is True
    assert two.breakdown["optimizer_states"] == pytest.approx(one.breakdown["optimizer_states"] / 2, rel=0.01)
