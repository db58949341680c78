"""llama.cpp's own converters (convert_lora_to_gguf.py, convert_hf_to_gguf.py, from the llama_cpp_python sdist) on
peftkit's outputs: a trained adapter, a mixed-rank combined adapter and a merged model; and `peftkit export
--format gguf` against the converter, tensor by tensor. The delta llama.cpp applies is recomputed from the GGUF file
(alpha / the tensor's rank) and compared with the one HF PEFT applies."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import peftkit
from peftkit.cli import main
from peftkit.merging.deltas import combine, read_lora, write_lora
from peftkit.merging.stream import merge_to_disk
from tests.io.llama_cpp import as_gguf, converters_folder, gguf_deltas, peft_deltas, relative_errors, run_converter
from tests.tiny import perturb_adapter, save_tiny_checkpoint, tiny_model

pytestmark = pytest.mark.slow
LORA = "convert_lora_to_gguf.py"


def _adapter(base, folder, seed, **config):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peftkit.inject(model, peftkit.LoraConfig(**config))
    perturb_adapter(model, seed=seed)  # B random, as after training
    peftkit.save_adapter(model, folder)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama_cpp")
    base = save_tiny_checkpoint(tmp / "base")
    trained = _adapter(base, tmp / "trained", 2, r=4, lora_alpha=8, target_modules="all-linear")
    x = _adapter(base, tmp / "x", 3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    y = _adapter(base, tmp / "y", 4, r=2, lora_alpha=5, target_modules=["q_proj", "k_proj", "down_proj"])
    write_lora(combine([read_lora(x, 0.7), read_lora(y, -0.3)], "concat"), tmp / "combined")
    patterned = _adapter(base, tmp / "patterned", 5, r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                         rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 2})
    config = json.loads((base / "config.json").read_text())
    return {"tmp": tmp, "base": base, "trained": trained, "combined": tmp / "combined", "patterned": patterned,
            "config": config, "llama_cpp": converters_folder()}


def _converted(files, name):
    out = files["tmp"] / f"{name}.converter.gguf"
    if not out.exists():
        run_converter(files["llama_cpp"], LORA, "--base", files["base"], "--outfile", out, files[name])
    return out


def _exported(files, name):
    out = files["tmp"] / f"{name}.peftkit.gguf"
    if not out.exists():
        cli(["export", "--format", "gguf", str(files[name]), "-o", str(out), "--base", str(files["base"])])
    return out


def cli(args):
    """Run the peftkit CLI; it must succeed."""
    try:
        main(args)
    except SystemExit as done:
        assert done.code in (0, None), done.code


@pytest.mark.parametrize("name", ["trained", "combined"])
def test_converter_applies_what_peft_applies(files, name):
    """The combined adapter has ranks 6 (q), 4 (v), 2 (k, down) before it is written: written at one rank, the
    converter's GGUF applies PEFT's deltas (with the old rank/alpha patterns, q/v came out at 1/3 strength)."""
    config = json.loads((files[name] / "adapter_config.json").read_text())
    if name == "combined":
        assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
        assert config["target_modules"] == ["down_proj", "k_proj", "q_proj", "v_proj"]
    want = as_gguf(peft_deltas(files["base"], files[name]), files["config"])
    errors = relative_errors(gguf_deltas(_converted(files, name)), want)
    assert max(errors.values()) <= 0.01, errors


def test_rank_patterns_are_misread_by_the_converter_but_not_by_export(files):
    """An adapter with rank_pattern / alpha_pattern (PEFT: v at 2/2 = 1) is applied by the converter's GGUF at
    alpha / rank = 4/2 = 2 on v; peftkit's export folds the difference into B and matches PEFT."""
    want = as_gguf(peft_deltas(files["base"], files["patterned"]), files["config"])
    theirs = relative_errors(gguf_deltas(_converted(files, "patterned")), want)
    assert all(theirs[k] > 0.5 for k in theirs if "attn_v" in k) and all(theirs[k] < 1e-5 for k in theirs if "attn_q" in k)
    ours = relative_errors(gguf_deltas(_exported(files, "patterned")), want)
    assert max(ours.values()) <= 1e-5, ours


@pytest.mark.parametrize("name", ["trained", "combined", "qwen2"])
def test_export_writes_what_the_converter_writes(files, name):
    import gguf

    if name == "qwen2":  # another architecture: no q/k permutation, biased q/k/v layers
        tiny_model("qwen2").save_pretrained(files["tmp"] / "qwen2-base")
        files["qwen2"] = _adapter(files["tmp"] / "qwen2-base", files["tmp"] / "qwen2", 6, r=4, lora_alpha=8,
                                  target_modules="all-linear")
        theirs = files["tmp"] / "qwen2.converter.gguf"
        run_converter(files["llama_cpp"], LORA, "--base", files["tmp"] / "qwen2-base", "--outfile", theirs, files["qwen2"])
        ours = files["tmp"] / "qwen2.peftkit.gguf"
        cli(["export", str(files["qwen2"]), "-o", str(ours), "--base", str(files["tmp"] / "qwen2-base")])
    else:
        theirs, ours = _converted(files, name), _exported(files, name)
    theirs, ours = gguf.GGUFReader(theirs), gguf.GGUFReader(ours)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(theirs.tensors, ours.tensors, strict=True):
        assert (a.tensor_type, list(a.shape)) == (b.tensor_type, list(b.shape)), a.name
        assert np.array_equal(a.data, b.data), a.name
    fields = set(theirs.fields) - {"general.name"}
    assert fields == set(ours.fields) - {"general.name"}
    for key in fields - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}:
        assert theirs.fields[key].contents() == ours.fields[key].contents(), key


def test_merged_model_converts(files):
    """A merge's output folder converts to GGUF with `peftkit export --format gguf`, which runs llama.cpp's
    convert_hf_to_gguf.py on it (architectures, tokenizer present); the GGUF holds the merged weights."""
    import gguf

    merged = files["tmp"] / "merged"
    merge_to_disk(str(files["base"]), [str(files["trained"])], str(merged))
    out = files["tmp"] / "merged.peftkit.gguf"
    cli(["export", "--format", "gguf", str(merged), "-o", str(out), "--outtype", "f32", "--llama-cpp",
         str(files["llama_cpp"])])
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    weights = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).state_dict()
    v = np.array(tensors["blk.1.attn_v.weight"].data)
    assert np.array_equal(v, weights["model.layers.1.self_attn.v_proj.weight"].numpy())
