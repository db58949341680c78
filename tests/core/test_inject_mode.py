"""Injected adapter modules take the model's mode: torch builds modules in training mode, so an adapter injected
into (or loaded onto) a model in eval mode had its dropouts active until the next `model.eval()`."""

from __future__ import annotations

import pytest

import peftkit
from peftkit.core.registry import get_method, method_names
from tests.tiny import WIDE, tiny_model

ADAPTERS = [name for name in method_names() if not get_method(name).trains_base
            and not get_method(name).load_options(get_method(name).build_config({}))]  # no quantized base needed


@pytest.mark.parametrize("method", ADAPTERS)
def test_new_modules_follow_the_models_mode(method, tmp_path):
    config = get_method(method).build_config({})
    for training in (False, True):
        model = peftkit.inject(tiny_model("llama", WIDE).train(training), config)
        assert [n for n, m in model.named_modules() if m.training != training] == [], (method, training)
    peftkit.save_adapter(model, tmp_path / "a")
    loaded = peftkit.load_adapter(tiny_model("llama", WIDE).eval(), tmp_path / "a")
    assert not any(m.training for m in loaded.modules())


def test_a_wrapped_module_keeps_its_own_mode():
    model = tiny_model("llama", WIDE).train()
    model.model.layers[0].self_attn.q_proj.eval()  # a part the user put in eval mode
    peftkit.inject(model, peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    wrapper = model.model.layers[0].self_attn.q_proj
    assert wrapper.training and not wrapper.base_layer.training
