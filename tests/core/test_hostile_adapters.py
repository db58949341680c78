"""Hostile and damaged adapters of every mergeable method (VeRA, LoHa, LoKr, OFT, IA3, LoRA): a config field of the
wrong type, layers_to_transform that leaves out layers the file holds, tensors of an integer dtype. `load_adapter`
refuses each in one PeftkitError line, and `peftkit convert` / `merge` end in one `error:` line, exit code 2, no
output written (they had crashed with a TypeError, or converted every layer and the integers as weights). PEFT
options that a method does not implement (modules_to_save, exclude_modules) are refused by every such method."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit
from peftkit.core.registry import get_method
from peftkit.errors import PeftkitError
from tests.cli_errors import cli_error_line
from tests.tiny import perturb_adapter, tiny_model

METHODS = ("vera", "loha", "lokr", "oft", "ia3", "lora")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{method: adapter folder} over one tiny base, and the base."""
    root = tmp_path_factory.mktemp("hostile")
    base = root / "base"
    tiny_model("llama").save_pretrained(base)
    folders = {}
    for method in METHODS:
        model = tiny_model("llama")
        peftkit.inject(model, get_method(method).build_config({}))
        perturb_adapter(model)
        peftkit.save_adapter(model, root / method)
        folders[method] = root / method
    return folders, base


def _damaged(source, tmp_path, config=None, tensors=None):
    folder = tmp_path / "damaged"
    shutil.copytree(source, folder)
    if config:
        file = folder / "adapter_config.json"
        file.write_text(json.dumps({**json.loads(file.read_text()), **config}))
    if tensors:
        weights = folder / "adapter_model.safetensors"
        save_file({k: tensors(v).contiguous() for k, v in load_file(weights).items()}, weights)
    return folder


CASES = {
    "layers [99]": (dict(config={"layers_to_transform": [99]}), "layers_to_transform [99] leaves out"),
    "layers [0]": (dict(config={"layers_to_transform": [0]}), "is in layer 1"),
    "layers 'x'": (dict(config={"layers_to_transform": "x"}), "layers_to_transform must be"),
    "int64": (dict(tensors=lambda t: (t * 100).to(torch.int64)), "is int64; adapter weights are floating point"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method", METHODS)
def test_damaged_adapters_are_refused(saved, tmp_path, method, case):
    folders, _ = saved
    damage, expected = CASES[case]
    folder = _damaged(folders[method], tmp_path, **damage)
    with pytest.raises(PeftkitError, match=re.escape(expected)):
        peftkit.load_adapter(torch.nn.Module(), folder)


@pytest.mark.parametrize("method,field", [("vera", "target_modules"), ("ia3", "target_modules"),
                                          ("ia3", "feedforward_modules"), ("lokr", "target_modules")])
@pytest.mark.parametrize("value", [5, [1], {"q_proj": 1}])
def test_target_fields_of_the_wrong_type(saved, tmp_path, method, field, value):
    folders, _ = saved
    folder = _damaged(folders[method], tmp_path, config={field: value})
    with pytest.raises(PeftkitError, match=field) as exc:
        peftkit.load_adapter(torch.nn.Module(), folder)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("field", ["modules_to_save", "exclude_modules"])
@pytest.mark.parametrize("method", ["oft", "ia3", "lokr", "loha"])
def test_unsupported_peft_fields_are_refused_alike(saved, tmp_path, method, field):
    """OFT and IA3 loaded an adapter with modules_to_save while ignoring it (LoKr and LoHa refused it)."""
    folders, _ = saved
    folder = _damaged(folders[method], tmp_path, config={field: ["lm_head"]})
    with pytest.raises(PeftkitError, match=f"sets {field} \\(\\['lm_head'\\]\\), which peftkit's"):
        peftkit.load_adapter(torch.nn.Module(), folder)


@pytest.mark.parametrize("command", ["convert", "merge"])
def test_the_cli_refuses_them_before_writing(saved, tmp_path, capsys, command):
    folders, base = saved
    for method, (damage, expected) in zip(("lokr", "vera", "oft", "lora"), CASES.values(), strict=True):
        folder = _damaged(folders[method], tmp_path / method, **damage)
        out = tmp_path / method / "out"
        argv = (["convert", str(folder), "--rank", "2"] if command == "convert" else ["merge", "-a", str(folder)])
        line = cli_error_line([*argv, "--base", str(base), "-o", str(out)], capsys)
        assert expected in line, line
        assert not out.exists()
