"""Bottleneck adapters: equals base at init, 2dm+m+d parameters per adapter, save/load, training, refusals."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import peftkit
from peftkit.core.counting import count_parameters
from peftkit.core.registry import get_method
from peftkit.errors import PeftkitError
from tests.tiny import WIDE, tiny_config, tiny_model, token_batch, train_steps

D, LAYERS = 64, 2
ADAPTERS_PER_LAYER = {"houlsby": 2, "pfeiffer": 1, "parallel": 1}


def _perturb(model: nn.Module) -> None:
    """Give every up-projection non-zero weights, as training would."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adapter_up" in name:
                param.normal_(0, 0.2)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer", "parallel"])
def test_equals_base_at_init_and_counts(arch: str, variant: str) -> None:
    ids = token_batch()
    base = tiny_model(arch, WIDE)(input_ids=ids).logits
    model = peftkit.inject(tiny_model(arch, WIDE), peftkit.AdapterConfig(variant=variant, reduction_factor=16))
    assert torch.equal(model(input_ids=ids).logits, base)
    m = D // 16
    expected = LAYERS * ADAPTERS_PER_LAYER[variant] * (2 * D * m + m + D)
    assert peftkit.trainable_parameters(model)[0] == expected
    assert count_parameters(tiny_config(arch, WIDE), "adapter", variant=variant, reduction_factor=16)[0] == expected
    _perturb(model)
    assert not torch.allclose(model(input_ids=ids).logits, base, atol=1e-4)  # the adapters are really wired in
    with peftkit.disable_adapters(model):
        assert torch.equal(model(input_ids=ids).logits, base)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_load_round_trip(arch: str, tmp_path) -> None:
    ids = token_batch()
    model = peftkit.inject(tiny_model(arch, WIDE), peftkit.AdapterConfig(variant="houlsby", bottleneck_size=5, non_linearity="gelu"))
    _perturb(model)
    want = model(input_ids=ids).logits
    peftkit.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PEFTKIT_ADAPTER" and config["bottleneck_size"] == 5
    loaded = peftkit.load_adapter(tiny_model(arch, WIDE), tmp_path / "a")
    assert torch.equal(loaded(input_ids=ids).logits, want)


def test_load_rejects_adapter_for_another_model(tmp_path) -> None:
    model = peftkit.inject(tiny_model("llama", WIDE), peftkit.AdapterConfig(variant="pfeiffer"))
    peftkit.save_adapter(model, tmp_path / "a")
    with pytest.raises(PeftkitError, match="another base model|shape"):
        peftkit.load_adapter(tiny_model("gpt2", WIDE), tmp_path / "a")


@pytest.mark.parametrize("variant", ["houlsby", "parallel"])
def test_training_lowers_loss(variant: str) -> None:
    torch.manual_seed(0)
    model = peftkit.inject(tiny_model("llama", WIDE), peftkit.AdapterConfig(variant=variant, reduction_factor=4))
    first, last = train_steps(model, token_batch(4, 12))
    assert last < first - 0.1


def test_merge_refused_with_reason() -> None:
    model = peftkit.inject(tiny_model("llama", WIDE), peftkit.AdapterConfig())
    with pytest.raises(PeftkitError, match="non-linearity"):
        peftkit.merge(model)


def test_delete_adapter_restores_modules() -> None:
    model = tiny_model("llama", WIDE)
    mlp_type = type(model.model.layers[0].mlp)
    peftkit.inject(model, peftkit.AdapterConfig(variant="houlsby"))
    peftkit.delete_adapter(model, "default")
    assert type(model.model.layers[0].mlp) is mlp_type
    assert peftkit.trainable_parameters(model)[0] == 0


def test_cli_options_map_to_fields() -> None:
    config = get_method("adapter").build_config({"variant": "pfeiffer", "reduction_factor": "8", "dropout": 0.1})
    assert (config.variant, config.reduction_factor, config.dropout, config.locations) == ("pfeiffer", 8, 0.1, ("mlp",))
    assert get_method("adapter").build_config({"variant": "parallel"}).scaling == 4.0


@pytest.mark.parametrize("bad", [{"reduction_factor": 0}, {"reduction_factor": -2}, {"bottleneck_size": 0}])
def test_bad_sizes(bad: dict) -> None:
    with pytest.raises(PeftkitError, match="(reduction_factor must be >= 1 and <= 65,536|bottleneck_size must be a positive integer)"):
        peftkit.AdapterConfig(**bad)


def test_reduction_factor_larger_than_hidden() -> None:
    with pytest.raises(PeftkitError, match="larger than the hidden size 64"):
        peftkit.inject(tiny_model("llama", WIDE), peftkit.AdapterConfig(reduction_factor=65))


def test_unknown_variant_lists_valid_ones() -> None:
    with pytest.raises(PeftkitError, match="houlsby, pfeiffer, parallel"):
        peftkit.AdapterConfig(variant="lora")


class _Odd(nn.Module):
    """A model of an unknown type whose layers have no attention / MLP submodule to find."""

    def __init__(self) -> None:
        super().__init__()
        self.config = type("C", (), {"model_type": "oddball", "hidden_size": 32})()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(32, 32)) for _ in range(2)])
        self.embed = nn.Embedding(4, 32)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed


def test_architecture_without_attention_is_named() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(PeftkitError, match="'oddball'.*attention"):
            peftkit.inject(_Odd(), peftkit.AdapterConfig(variant="houlsby"))
        with pytest.raises(PeftkitError, match="'oddball'.*mlp"):
            peftkit.inject(_Odd(), peftkit.AdapterConfig(variant="pfeiffer"))
