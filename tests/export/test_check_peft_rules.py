"""`peftkit check` says "HF PEFT: yes" only where PEFT 0.21.2's own loader accepts the adapter: each case is loaded
with the real PEFT too, so the verdict and PEFT cannot drift apart. Cases: target_parameters of the wrong type or
selecting nothing (MoE and plain adapters), and OFT / LoKr / LoHa on GPT-2's Conv1D layers, which PEFT refuses."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
from peft import PeftModel

import peftkit
from peftkit.export.portability import check_portability
from tests.methods.moe_helpers import EXPERTS, moe_model
from tests.tiny import perturb_adapter, tiny_model


def _peft_verdict(path) -> str:
    return next(v for v in check_portability(path).verdicts if v.consumer == "HF PEFT").status


def _peft_loads_all(model, path) -> bool:
    """Whether PEFT loads the adapter with every saved tensor used (it only warns when target_parameters select
    nothing, and drops those tensors)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            PeftModel.from_pretrained(model, str(path))
        except (TypeError, ValueError):
            return False
    return not any("no parameter was matched" in str(w.message) for w in seen)


def _edited(source, tmp_path, **edit):
    target = tmp_path / "edited"
    shutil.copytree(source, target)
    file = target / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **edit}))
    return target


@pytest.fixture(scope="module")
def moe_adapter(tmp_path_factory):
    model = peftkit.inject(moe_model("mixtral"), peftkit.LoraConfig(r=2, target_modules=["q_proj"],
                                                                    target_parameters=EXPERTS))
    perturb_adapter(model)
    folder = tmp_path_factory.mktemp("moe") / "adapter"
    peftkit.save_adapter(model, folder)
    return folder


@pytest.mark.parametrize("names,verdict", [(None, "yes"), ("mlp.experts.down_proj", "no"), ([3], "no"),
                                           (["mlp.gate.up"], "no")])
def test_target_parameters_follow_peft(moe_adapter, tmp_path, names, verdict):
    adapter = moe_adapter if names is None else _edited(moe_adapter, tmp_path, target_parameters=names)
    assert _peft_verdict(adapter) == verdict
    assert _peft_loads_all(moe_model("mixtral"), adapter) == (verdict == "yes")


def test_a_string_target_parameters_on_a_plain_lora(tmp_path):
    model = peftkit.inject(tiny_model("llama"), peftkit.LoraConfig(r=2))
    peftkit.save_adapter(model, tmp_path / "plain")
    adapter = _edited(tmp_path / "plain", tmp_path, target_parameters="mlp.up_proj.weight")
    assert _peft_verdict(adapter) == "no" and not _peft_loads_all(tiny_model("llama"), adapter)


@pytest.mark.parametrize("config", ["OFTConfig", "LokrConfig", "LohaConfig"])
def test_conv1d_adapters_of_methods_peft_refuses_there(tmp_path, config):
    model = peftkit.inject(tiny_model("gpt2"), getattr(peftkit, config)())
    peftkit.save_adapter(model, tmp_path / "a")
    assert _peft_verdict(tmp_path / "a") == "no"
    assert not _peft_loads_all(tiny_model("gpt2"), tmp_path / "a")
    assert peftkit.load_adapter(tiny_model("gpt2"), tmp_path / "a") is not None  # peftkit itself loads it


@pytest.mark.parametrize("config", ["OFTConfig", "LokrConfig", "LohaConfig"])
@pytest.mark.parametrize("targets,verdict", [(["zzz"], "no"), (5, "no"), (["q_proj"], "no"), (["q_proj", "v_proj"], "yes")])
def test_target_modules_rules_hold_for_every_method(tmp_path, config, targets, verdict):
    """The target_modules rules `check` applies to LoRA hold for the other PEFT types too: every adapted module of
    the file must be selected (PEFT builds the selected ones and drops the others' tensors)."""
    model = peftkit.inject(tiny_model("llama"), getattr(peftkit, config)(target_modules=["q_proj", "v_proj"]))
    peftkit.save_adapter(model, tmp_path / "a")
    adapter = _edited(tmp_path / "a", tmp_path, target_modules=targets)
    assert _peft_verdict(adapter) == verdict
    if verdict == "yes":
        assert _peft_loads_all(tiny_model("llama"), adapter)
    elif targets != ["q_proj"]:  # PEFT loads q_proj's and drops v_proj's tensors, with a warning of missing keys
        assert not _peft_loads_all(tiny_model("llama"), adapter)
