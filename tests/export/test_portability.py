"""`peftkit check`: which runtimes load an adapter and why not (HF PEFT, vLLM, llama.cpp, TGI); exit 0 when all
can, 3 when some cannot."""

from __future__ import annotations

import json

import pytest

import peftkit
from peftkit.cli import main
from peftkit.export.portability import check_portability
from peftkit.merging.deltas import combine, read_lora, write_lora
from tests.export.test_gguf_export import _with_saved_head
from tests.tiny import WIDE, perturb_adapter, tiny_model


def _saved(tmp, name, config, size=None, edit=None):
    model = tiny_model("llama", size) if size else tiny_model("llama")
    peftkit.inject(model, config)
    perturb_adapter(model)
    peftkit.save_adapter(model, tmp / name)
    if edit:
        path = tmp / name / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    return tmp / name


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("portability")
    lora = peftkit.LoraConfig
    x = _saved(tmp, "plain", lora(r=4, target_modules=["q_proj", "v_proj"]))
    y = _saved(tmp, "y", lora(r=2, lora_alpha=3, target_modules=["q_proj", "k_proj"]))
    write_lora(combine([read_lora(x), read_lora(y)]), tmp / "combined")
    return {
        "tmp": tmp, "plain": x, "combined": tmp / "combined",
        "rank32": _saved(tmp, "rank32", lora(r=32, target_modules=["q_proj"])),
        # peftkit's old combine format: scale 1 per module through both patterns (vLLM: 4/4, llama.cpp: 4/2 on v)
        "patterns": _saved(tmp, "patterns", lora(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                  rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 2})),
        # a rank pattern alone: PEFT 8/2 on v, as llama.cpp; vLLM and TGI 8/4
        "rank_pattern": _saved(tmp, "rank_pattern", lora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          rank_pattern={"v_proj": 2})),
        "rslora": _saved(tmp, "rslora", lora(r=4, target_modules=["q_proj"], use_rslora=True)),
        "saved": _with_saved_head(_saved(tmp, "saved", lora(r=2, target_modules=["q_proj"]))),
        "dora": _saved(tmp, "dora", lora(r=2, target_modules=["q_proj"]), edit={"use_dora": True}),
        "bias": _saved(tmp, "bias", lora(r=2, target_modules=["q_proj"]), edit={"bias": "all"}),
        "abs_base": _saved(tmp, "abs_base", lora(r=2, target_modules=["q_proj"]),
                           edit={"base_model_name_or_path": str(tmp / "base")}),
        "layer0": _saved(tmp, "layer0", lora(r=2, target_modules=r".*(layers\.0\.self_attn\.q_proj|v_proj)")),
        "bottleneck": _saved(tmp, "bottleneck", peftkit.AdapterConfig(variant="houlsby"), size=WIDE),
        "prefix": _saved(tmp, "prefix", peftkit.PrefixConfig(num_virtual_tokens=2)),
    }


def _verdicts(path):
    return {v.consumer: (v.status, " ".join(v.reasons)) for v in check_portability(path).verdicts}


def test_plain_and_combined_adapters_load_everywhere(files):
    for name in ("plain", "combined"):
        assert {k: s for k, (s, _) in _verdicts(files[name]).items()} == dict.fromkeys(
            ("HF PEFT", "vLLM", "llama.cpp", "TGI"), "yes"), name


@pytest.mark.parametrize("name,expected", [
    ("rank32", {"vLLM": ("needs", "--max-lora-rank 32")}),
    ("patterns", {"llama.cpp": ("needs", "v_proj at 2x")}),
    ("rank_pattern", {"vLLM": ("no", "v_proj at 0.5x"), "TGI": ("no", "another strength")}),
    ("rslora", {"llama.cpp": ("needs", "no rsLoRA")}),
    ("saved", {"vLLM": ("no", "modules_to_save (lm_head)"), "llama.cpp": ("no", "embed_tokens / lm_head"),
               "TGI": ("no", "modules_to_save")}),
    ("dora", {"vLLM": ("no", "DoRA"), "llama.cpp": ("no", "DoRA"), "TGI": ("no", "DoRA")}),
    ("bias", {"vLLM": ("no", "bias='all'"), "llama.cpp": ("no", "bias='all'"), "TGI": ("no", "bias='all'")}),
    ("abs_base", {"HF PEFT": ("needs", "local path"), "llama.cpp": ("needs", "--base")}),
    ("layer0", {"TGI": ("no", "q_proj are adapted in only some layers")}),
    ("bottleneck", {"HF PEFT": ("no", "peftkit's own type"), "vLLM": ("no", "only LoRA"),
                    "llama.cpp": ("no", "only LoRA"), "TGI": ("no", "only LoRA")}),
    ("prefix", {"vLLM": ("no", "not PREFIX_TUNING"), "llama.cpp": ("no", "only LoRA"), "TGI": ("no", "only LoRA")}),
])
def test_each_obstacle_is_named(files, name, expected):
    verdicts = _verdicts(files[name])
    for consumer, (status, reason) in verdicts.items():
        if consumer in expected:
            assert status == expected[consumer][0] and expected[consumer][1] in reason, (consumer, status, reason)
        else:
            assert status == "yes", (consumer, status, reason)


def test_cli_table_and_exit_codes(files, capsys):
    main(["check", str(files["rank32"])])  # loads everywhere (vLLM after a flag): exit 0
    out = capsys.readouterr().out
    assert "vLLM" in out and "--max-lora-rank 32" in out
    with pytest.raises(SystemExit) as done:
        main(["check", str(files["saved"]), "--json"])
    assert done.value.code == 3
    report = json.loads(capsys.readouterr().out)
    assert report["all_load"] is False and {v["consumer"] for v in report["verdicts"]} >= {"vLLM", "TGI"}
    with pytest.raises(SystemExit) as done:
        main(["check", str(files["tmp"] / "missing")])
    assert done.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_a_pair_that_does_not_fit_its_rank_loads_nowhere(files, tmp_path):
    """A lora_A with more rows than the config's rank: PEFT refuses it (size mismatch), so check must not say yes."""
    import shutil

    import torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(files["plain"], bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(8, tensors[key].shape[1])
    save_file(tensors, bad / "adapter_model.safetensors")
    verdicts = _verdicts(bad)
    assert all(status == "no" and "do not fit the rank 4" in reason for status, reason in verdicts.values()), verdicts
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(tiny_model("llama"), bad)
