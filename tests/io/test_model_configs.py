"""Every model folder peftkit writes has a complete config.json (architectures, which llama.cpp's converter and vLLM
choose the model class by, and the dtype under both names): the GGUF conversion, the embedded model's cache (an
outdated one is repaired in place), full / freeze fine-tunes (save_model_folder) and the streaming merge."""

import json
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from peftkit.io import gguf, models
from peftkit.io.model_config import complete_config
from peftkit.io.models import save_model_folder
from peftkit.merging.stream import merge_to_disk
from tests.merging.fixtures import save_base, save_lora
from tests.tiny import logits, tiny_input, tiny_model


def _config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def _assert_complete(folder, architectures, dtype):
    config = _config(folder)
    assert config["architectures"] == architectures
    assert config["dtype"] == config["torch_dtype"] == dtype
    AutoConfig.from_pretrained(folder)  # transformers reads both names without complaint


def test_gguf_conversion_writes_a_complete_config(tmp_path):
    model = tiny_model("llama")
    model.config.architectures = None  # as a GGUF-loaded config has it
    model.config.quantization_config = {"quant_method": "gguf"}
    model.generation_config = None
    gguf.write_model_config(model, tmp_path, torch.float32)
    _assert_complete(tmp_path, ["LlamaForCausalLM"], "float32")
    assert "quantization_config" not in _config(tmp_path)
    assert (tmp_path / "generation_config.json").is_file()


@pytest.fixture
def outdated_cache(tmp_path, monkeypatch):
    """A cache holding the embedded model's folder as conversion 1 wrote it (a tiny model stands in for the
    weights): no architectures, no torch_dtype, no generation config, no conversion record."""
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "smollm2-135m-instruct"
    tiny_model("llama").save_pretrained(folder)
    config = _config(folder)
    del config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").unlink()
    monkeypatch.setattr(models, "convert_gguf", lambda *a: pytest.fail("an outdated cache is repaired, not converted"))
    return folder


def test_outdated_embedded_cache_is_repaired_in_place(outdated_cache):
    weights = outdated_cache / "model.safetensors"
    before = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    assert models.embedded_folder() == outdated_cache
    _assert_complete(outdated_cache, ["LlamaForCausalLM"], "float32")
    assert (outdated_cache / "generation_config.json").is_file()
    assert gguf.conversion_version(outdated_cache) == gguf.CONVERSION_VERSION
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == before  # the weights were not rewritten
    assert not [p for p in outdated_cache.iterdir() if ".tmp" in p.name]
    stamp = (outdated_cache / "config.json").stat().st_mtime_ns
    models.embedded_folder()  # up to date now: nothing is rewritten
    assert (outdated_cache / "config.json").stat().st_mtime_ns == stamp
    loaded = AutoModelForCausalLM.from_pretrained(outdated_cache).eval()
    assert torch.equal(logits(loaded, tiny_input()), logits(tiny_model("llama"), tiny_input()))


def test_the_cached_embedded_model_has_a_complete_config():
    folder = models.cache_dir() / "smollm2-135m-instruct"
    if not (folder / "model.safetensors").is_file():
        pytest.skip("the embedded model has not been converted on this machine")
    assert models.embedded_folder() == folder  # repairs the cache if an older peftkit converted it
    _assert_complete(folder, ["LlamaForCausalLM"], "float32")
    assert (folder / "generation_config.json").is_file()


def test_complete_config_keeps_architectures_and_falls_back_to_the_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "torch_dtype": "bfloat16"}))
    config = complete_config(tmp_path)
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["dtype"] == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["MyLlama"]}))
    assert complete_config(tmp_path, architectures=["Other"], dtype=torch.float16)["architectures"] == ["MyLlama"]
    assert _config(tmp_path)["torch_dtype"] == "float16"
    assert os.listdir(tmp_path) == ["config.json"]


def test_full_fine_tune_folder_has_a_complete_config(tmp_path):
    tokenizer_folder = tmp_path / "tok"
    from tests.tiny import save_tiny_checkpoint

    save_tiny_checkpoint(tokenizer_folder)
    model = tiny_model("qwen2").to(torch.bfloat16)
    save_model_folder(model, AutoTokenizer.from_pretrained(tokenizer_folder), tmp_path / "out", {"method": "full"})
    _assert_complete(tmp_path / "out", ["Qwen2ForCausalLM"], "bfloat16")


@pytest.mark.parametrize("dtype,written", [(None, "float32"), ("bf16", "bfloat16")])
def test_merged_folder_has_a_complete_config(tmp_path, dtype, written):
    base = save_base("llama", tmp_path / "base")
    config = _config(base)
    del config["architectures"], config["dtype"]  # as the embedded model's first conversion wrote it
    (base / "config.json").write_text(json.dumps(config))
    adapter = save_lora("llama", tmp_path / "ad")
    merge_to_disk(str(base), [str(adapter)], str(tmp_path / "merged"), dtype=dtype)
    _assert_complete(tmp_path / "merged", ["LlamaForCausalLM"], written)


def test_merged_folder_keeps_the_base_architectures(tmp_path):
    base = save_base("gpt2", tmp_path / "base")
    adapter = save_lora("gpt2", tmp_path / "ad")
    merge_to_disk(str(base), [str(adapter)], str(tmp_path / "merged"))
    _assert_complete(tmp_path / "merged", ["GPT2LMHeadModel"], "float32")
