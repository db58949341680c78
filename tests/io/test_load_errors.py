"""Bad adapter folders and model paths get one clear PeftkitError naming what is wrong, and nothing is half-done."""

import json

import pytest
import torch
from safetensors.torch import save_file

import peftkit
from peftkit import LoraConfig, PeftkitError
from peftkit.methods.lora.layer import LoraLayer
from tests.tiny import perturb_adapter, tiny_model


def _saved(tmp_path, kind="llama", r=4):
    model = tiny_model(kind)
    peftkit.inject(model, LoraConfig(r=r))
    perturb_adapter(model)
    peftkit.save_adapter(model, tmp_path / "ad")
    return tmp_path / "ad"


def test_adapter_for_another_model_names_tensor_and_shapes(tmp_path):
    folder = _saved(tmp_path)
    other = tiny_model("llama")
    other.model.layers[0].self_attn.q_proj = torch.nn.Linear(48, 32, bias=False)
    with pytest.raises(PeftkitError, match=r"q_proj\.lora_A\.weight' has shape \(4, 32\) but the model needs \(4, 48\)"):
        peftkit.load_adapter(other, folder)
    assert not any(isinstance(m, LoraLayer) for m in other.modules())  # nothing injected


def test_adapter_for_missing_module(tmp_path):
    folder = _saved(tmp_path, kind="gpt2")
    with pytest.raises(PeftkitError, match=r"targets module 'transformer\.h\.0\.attn\.c_attn', which does not exist"):
        peftkit.load_adapter(tiny_model("llama"), folder)


def test_folder_without_config_or_weights(tmp_path):
    folder = _saved(tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(PeftkitError, match="has no adapter_model.safetensors"):
        peftkit.load_adapter(tiny_model("llama"), folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(PeftkitError, match="has no adapter_config.json"):
        peftkit.load_adapter(tiny_model("llama"), folder)
    with pytest.raises(PeftkitError, match="does not exist"):
        peftkit.load_adapter(tiny_model("llama"), tmp_path / "nope")


def test_corrupted_safetensors(tmp_path):
    folder = _saved(tmp_path)
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PeftkitError, match="corrupted"):
        peftkit.load_adapter(tiny_model("llama"), folder)


def test_unknown_tensor_is_refused_not_dropped(tmp_path):
    folder = _saved(tmp_path)
    save_file({"base_model.model.lm_head.weight": torch.zeros(2, 2)}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(PeftkitError, match="is not a LoRA weight"):
        peftkit.load_adapter(tiny_model("llama"), folder)


def test_unsupported_peft_type_and_dora(tmp_path):
    folder = _saved(tmp_path)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(PeftkitError, match="use_dora"):
        peftkit.load_adapter(tiny_model("llama"), folder)
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "ADALORA"}))
    with pytest.raises(PeftkitError, match="cannot load adapters of peft_type 'ADALORA'"):
        peftkit.load_adapter(tiny_model("llama"), folder)


def test_model_path_that_does_not_exist(tmp_path):
    with pytest.raises(PeftkitError, match="does not exist"):
        peftkit.load_model(str(tmp_path / "missing-model"))
    with pytest.raises(PeftkitError, match="does not exist"):
        peftkit.load_model(str(tmp_path / "model.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PeftkitError, match="without config.json"):
        peftkit.load_model(str(tmp_path / "empty"))


def test_hub_id_unreachable_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PeftkitError, match="could not load model 'nobody-here/no-such-model'"):
        peftkit.load_model("nobody-here/no-such-model")
