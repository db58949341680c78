"""EVA (`--init eva`): on the same micro-batches peftkit's A equals what HF PEFT's `initialize_lora_eva_weights`
gives, the rank redistribution gives PEFT's rank_pattern / alpha_pattern, and the saved adapter loads in PEFT."""

from __future__ import annotations

import copy
import functools
import itertools

import pytest
import torch
from peft import EvaConfig, PeftModel, get_peft_model, initialize_lora_eva_weights
from peft import LoraConfig as PeftLoraConfig

import peftkit
from peftkit.core.method import InitData
from peftkit.core.registry import get_method
from peftkit.core.state import adapters
from peftkit.errors import PeftkitError
from peftkit.methods.lora import LoraConfig
from tests.tiny import logits, perturb_adapter, tiny_input, tiny_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
TAU = 0.9  # converges in ~30 micro-batches here (0.99, the default, takes ~100: the same test, 3x slower)


def _batches(n: int = 6, rows: int = 4, length: int = 12) -> list[dict[str, torch.Tensor]]:
    """Micro-batches with padding (attention mask) and prompt tokens (labels -100), as the trainer collates them."""
    out = []
    for i in range(n):
        ids = torch.randint(3, 128, (rows, length), generator=torch.Generator().manual_seed(i))
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0
        labels = ids.clone()
        labels[:, :2] = -100
        labels[mask == 0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


@functools.cache
def _eva(rho: float, r: int = 4) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(peftkit's model, PEFT's model), both EVA-initialised on the same batches (made once per rho: the tests
    that change a model copy it first)."""
    ours = tiny_model("llama")
    config = LoraConfig(r=r, init="eva", eva_rho=rho, eva_tau=TAU, target_modules=TARGETS)
    peftkit.inject(ours, config)
    data = InitData(batches=lambda: itertools.cycle(_batches()), weight=lambda path: torch.empty(0))
    get_method("lora").initialise(ours, config, "default", data)
    theirs = get_peft_model(tiny_model("llama"), PeftLoraConfig(
        r=r, lora_alpha=2 * r, init_lora_weights="eva", eva_config=EvaConfig(rho=rho, tau=TAU), target_modules=TARGETS))
    initialize_lora_eva_weights(theirs, dataloader=_batches(), show_progress_bar=False)
    return ours, theirs


@pytest.mark.parametrize("rho", [1.0, 2.0])
def test_eva_matches_peft(rho):
    ours, theirs = _eva(rho)
    config = adapters(ours)["default"].config
    assert config.rank_pattern == theirs.peft_config["default"].rank_pattern
    assert config.alpha_pattern == theirs.peft_config["default"].alpha_pattern
    if rho > 1:
        assert config.rank_pattern  # the budget was redistributed
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    for path, layer in peft_layers.items():
        a = ours.get_submodule(path).lora_A["default"].weight
        assert torch.allclose(a, layer.lora_A["default"].weight, atol=1e-4), path
        assert not ours.get_submodule(path).lora_B["default"].weight.any()


def test_eva_starts_as_the_base_and_saves_for_peft(tmp_path):
    ours = copy.deepcopy(_eva(2.0)[0])
    ids = tiny_input()
    assert torch.equal(logits(ours, ids), logits(tiny_model("llama"), ids))  # B = 0
    perturb_adapter(ours)
    peftkit.save_adapter(ours, tmp_path / "eva")
    peft_model = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "eva").eval()
    assert (logits(peft_model, ids) - logits(ours, ids)).abs().max() <= 1e-5


def test_eva_refuses_more_components_than_inputs():
    model = tiny_model("llama")
    config = LoraConfig(r=20, init="eva", target_modules=["q_proj"])  # round(20 * 2) > 32 inputs
    peftkit.inject(model, config)
    data = InitData(batches=lambda: itertools.cycle(_batches()), weight=lambda path: torch.empty(0))
    with pytest.raises(PeftkitError, match="exceed the 32 inputs"):
        get_method("lora").initialise(model, config, "default", data)
