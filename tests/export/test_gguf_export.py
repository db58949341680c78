"""`peftkit export --format gguf` without llama.cpp: the adapter GGUF applies PEFT's deltas as llama.cpp reads it
(alpha / the tensor's rank, per module), and every input it cannot write is refused in one line, nothing written.
(tests/io/test_llama_cpp_converters.py compares the files with llama.cpp's own converter.)"""

from __future__ import annotations

import json

import pytest

import peftkit
from peftkit.cli import main
from peftkit.errors import PeftkitError
from peftkit.export.gguf_adapter import export_gguf_adapter
from peftkit.export.gguf_model import export_gguf_model
from tests.io.llama_cpp import as_gguf, gguf_deltas, peft_deltas, relative_errors
from tests.tiny import perturb_adapter, tiny_model


def _saved(tmp, kind, name, config):
    model = tiny_model(kind)
    peftkit.inject(model, config)
    perturb_adapter(model)
    peftkit.save_adapter(model, tmp / name)
    return tmp / name


def _with_saved_head(folder):
    """The adapter as PEFT saves one with modules_to_save=["lm_head"] (the head's weight in full)."""
    from safetensors.torch import load_file, save_file

    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"] = tiny_model("llama").lm_head.weight.detach().clone()
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf_export")
    for kind in ("qwen2", "llama", "gpt2"):
        tiny_model(kind).save_pretrained(tmp / f"{kind}-base")
    lora = peftkit.LoraConfig
    return {
        "tmp": tmp,
        "qwen2": _saved(tmp, "qwen2", "qwen2", lora(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True,
                                                   rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3})),
        "llama": _saved(tmp, "llama", "llama", lora(r=2, target_modules=["q_proj", "k_proj"])),
        "gpt2": _saved(tmp, "gpt2", "gpt2", lora(r=2, target_modules=["c_attn"])),
        "saved": _with_saved_head(_saved(tmp, "llama", "saved", lora(r=2, target_modules=["q_proj"]))),
        "bias": _saved(tmp, "llama", "bias", lora(r=2, target_modules=["q_proj"], lora_bias=True)),
        "prefix": _saved(tmp, "llama", "prefix", peftkit.PrefixConfig(num_virtual_tokens=2)),
    }


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_gguf_applies_peft_deltas(files, kind):
    """Qwen2 (no q/k permutation) with rsLoRA, a rank pattern and an alpha pattern; Llama with permuted q/k rows."""
    base = files["tmp"] / f"{kind}-base"
    out = export_gguf_adapter(files[kind], files["tmp"] / f"{kind}.gguf", base=base)
    config = json.loads((base / "config.json").read_text())
    errors = relative_errors(gguf_deltas(out), as_gguf(peft_deltas(base, files[kind]), config))
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize("name,needle", [
    ("saved", "modules_to_save"), ("bias", "lora_B biases"), ("prefix", "PREFIX_TUNING"), ("gpt2", "not 'gpt2'"),
])
def test_unwritable_adapters_are_refused(files, name, needle, capsys):
    out = files["tmp"] / f"{name}.gguf"
    base = files["tmp"] / ("gpt2-base" if name == "gpt2" else "llama-base")
    with pytest.raises(SystemExit) as done:
        main(["export", str(files[name]), "-o", str(out), "--base", str(base)])
    err = capsys.readouterr().err
    assert done.value.code == 2 and needle in err and err.count("\n") == 1, err
    assert not out.exists() and not list(files["tmp"].glob(f".{name}*"))


def test_output_rules(files):
    adapter, base = files["llama"], files["tmp"] / "llama-base"
    with pytest.raises(PeftkitError, match="ending in .gguf"):
        export_gguf_adapter(adapter, files["tmp"] / "x.bin", base=base)
    out = export_gguf_adapter(adapter, files["tmp"] / "twice.gguf", base=base)
    with pytest.raises(PeftkitError, match="already exists"):
        export_gguf_adapter(adapter, out, base=base)
    export_gguf_adapter(adapter, out, base=base, overwrite=True)
    foreign = files["tmp"] / "notes.gguf"
    foreign.write_text("mine")
    with pytest.raises(PeftkitError, match="not a GGUF file"):
        export_gguf_adapter(adapter, foreign, base=base, overwrite=True)
    assert foreign.read_text() == "mine"


def test_model_export_without_converter_says_how(files, monkeypatch):
    monkeypatch.delenv("PEFTKIT_LLAMA_CPP", raising=False)
    with pytest.raises(PeftkitError, match="convert_hf_to_gguf.py.*--llama-cpp"):
        export_gguf_model(files["tmp"] / "llama-base", files["tmp"] / "model.gguf")
    with pytest.raises(PeftkitError, match="has no convert_hf_to_gguf.py"):
        export_gguf_model(files["tmp"] / "llama-base", files["tmp"] / "model.gguf", llama_cpp=files["tmp"])
    assert not (files["tmp"] / "model.gguf").exists()
