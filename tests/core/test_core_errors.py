"""Each bad input of the core (method registry, injection, adapter state) gets one clear PeftkitError naming what is
wrong."""

import pytest

import peftkit
from peftkit import LoraConfig, PeftkitError
from peftkit.core.registry import get_method
from tests.tiny import tiny_model


def test_unknown_method_lists_registered():
    with pytest.raises(PeftkitError, match=r"unknown method 'loraa'; registered methods: .*lora"):
        get_method("loraa")


def test_targets_matching_nothing_list_existing_modules():
    with pytest.raises(PeftkitError, match=r"match no .*the model has: .*down_proj.*q_proj"):
        peftkit.inject(tiny_model("llama"), LoraConfig(target_modules=["qproj"]))


def test_unknown_cli_option_lists_valid_ones():
    with pytest.raises(PeftkitError, match="has no option 'rnk'; valid options: .*rank"):
        get_method("lora").build_config({"rnk": 4})
    assert get_method("lora").build_config({"rank": "4", "use_rslora": "true"}).use_rslora is True


def test_duplicate_adapter_name_and_merge_without_adapter():
    model = tiny_model("llama")
    with pytest.raises(PeftkitError, match="no adapter"):
        peftkit.merge(model)
    peftkit.inject(model, LoraConfig(r=2))
    with pytest.raises(PeftkitError, match="already has an adapter named 'default'"):
        peftkit.inject(model, LoraConfig(r=2))
    with pytest.raises(PeftkitError, match="no adapter named 'x'"):
        peftkit.set_adapter(model, "x")
