"""compress: full fine-tune delta -> LoRA by truncated SVD. Full rank reproduces, error falls with rank, energy rule,
caps, non-linear deltas reported / kept, and the adapter loads in peftkit and HF PEFT with the same logits."""

import json

import pytest
import torch
from peft import PeftModel

import peftkit
from peftkit.errors import PeftkitError
from peftkit.merging.compress import compress
from peftkit.merging.stream import merge_to_disk
from tests.merging.fixtures import load, max_param_diff
from tests.tiny import logits, tiny_input, tiny_model

SPECTRUM = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.6, 0.4, 0.2, 0.1])  # known singular values of one module's delta


def finetune(kind: str, seed: int = 5) -> torch.nn.Module:
    """The tiny base with every parameter moved (dense, full-rank deltas, norms and biases too), like a full FT.
    One module (layers.0 q_proj, or c_attn) gets a delta with the exact singular values SPECTRUM instead."""
    model = tiny_model(kind)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=g) * 0.02)
        if kind == "llama":
            w = model.model.layers[0].self_attn.q_proj.weight
            u, _ = torch.linalg.qr(torch.randn(w.shape[0], 8, generator=g))
            v, _ = torch.linalg.qr(torch.randn(w.shape[1], 8, generator=g))
            w.copy_(tiny_model(kind).model.layers[0].self_attn.q_proj.weight + u @ torch.diag(SPECTRUM) @ v.T)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compress")
    out = {}
    for kind in ("llama", "gpt2", "qwen2"):
        tiny_model(kind).save_pretrained(tmp / f"{kind}-base")
        finetune(kind).save_pretrained(tmp / f"{kind}-ft")
        out[kind] = (str(tmp / f"{kind}-base"), str(tmp / f"{kind}-ft"))
    return tmp, out


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_full_rank_keep_all_then_merge_reproduces_finetune(pair, kind):
    tmp, paths = pair
    report = compress(*paths[kind], str(tmp / f"{kind}-full"), rank=10_000, size_cap=False, keep_nonlinear=True)
    assert report.other and all(o["kept"] for o in report.other)  # norms, embeddings, biases kept, none lost
    merge_to_disk(paths[kind][0], [str(tmp / f"{kind}-full")], str(tmp / f"{kind}-rebuilt"))
    assert max_param_diff(load(tmp / f"{kind}-rebuilt"), finetune(kind)) <= 1e-4
    ids = tiny_input()
    config = json.loads((tmp / f"{kind}-full" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (kind == "gpt2")  # PEFT's flag for Conv1D targets, as PEFT writes it
    if kind == "gpt2":  # tied wte/lm_head saved in full: the in-memory loader refuses rather than break the tie
        with pytest.raises(PeftkitError, match="tied"):
            peftkit.load_adapter(tiny_model(kind), tmp / f"{kind}-full")
        return
    in_peftkit = logits(peftkit.load_adapter(tiny_model(kind), tmp / f"{kind}-full"), ids)
    assert (in_peftkit - logits(finetune(kind), ids)).abs().max() <= 1e-4


def test_error_falls_as_rank_grows_and_is_reported_honestly(pair):
    tmp, paths = pair
    errors = []
    for rank in (1, 2, 4, 8):
        report = compress(*paths["llama"], str(tmp / f"r{rank}"), rank=rank, overwrite=True)
        row = next(r for r in report.rows if r.module == "model.layers.1.mlp.down_proj")
        assert row.rank == rank
        model = peftkit.load_adapter(tiny_model("llama"), tmp / f"r{rank}")
        layer = model.model.layers[1].mlp.down_proj
        delta = finetune("llama").model.layers[1].mlp.down_proj.weight - tiny_model("llama").model.layers[1].mlp.down_proj.weight
        actual = float((layer.delta_weight("default") - delta.detach()).norm() / delta.detach().norm())
        assert abs(actual - row.rel_error) <= 1e-3  # the table says what the adapter really does
        errors.append(row.rel_error)
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0]


def test_energy_rule_picks_the_documented_rank(pair):
    tmp, paths = pair
    share = torch.cumsum(SPECTRUM**2, 0) / (SPECTRUM**2).sum()
    for energy in (0.5, 0.9, 0.99):
        expected = int((share >= energy).nonzero()[0]) + 1  # smallest r with Σ_{i<=r} s_i² >= energy·‖Δ‖²_F
        report = compress(*paths["llama"], str(tmp / "energy"), energy=energy, overwrite=True)
        row = next(r for r in report.rows if r.module == "model.layers.0.self_attn.q_proj")
        assert row.rank == expected and row.energy >= energy


def test_caps_are_applied_and_said(pair):
    tmp, paths = pair
    report = compress(*paths["llama"], str(tmp / "cap"), rank=32, overwrite=True)
    o_proj = next(r for r in report.rows if r.module.endswith("layers.0.self_attn.o_proj"))  # 32 x 32
    assert o_proj.rank == 16 and "m·n/(m+n)" in o_proj.note
    report = compress(*paths["llama"], str(tmp / "cap"), energy=1.0, max_rank=3, overwrite=True)
    assert all(r.rank <= 3 for r in report.rows) and any("--max-rank" in r.note for r in report.rows)
    report = compress(*paths["llama"], str(tmp / "cap"), rank=2, max_rank=8, overwrite=True)
    assert all(r.rank == 2 and not r.note for r in report.rows)  # no cap reached, none claimed


def test_dropped_nonlinear_is_reported_and_peft_loads_the_adapter(pair):
    tmp, paths = pair
    report = compress(*paths["llama"], str(tmp / "r4"), rank=4, overwrite=True)
    assert {"model.norm.weight", "model.embed_tokens.weight"} <= {o["tensor"] for o in report.other}
    assert not any(o["kept"] for o in report.other)
    assert 0 < report.adapter_bytes < report.source_bytes
    ids = tiny_input()
    ours = logits(peftkit.load_adapter(tiny_model("llama"), tmp / "r4"), ids)
    theirs = logits(PeftModel.from_pretrained(tiny_model("llama"), str(tmp / "r4")), ids)
    assert (ours - theirs).abs().max() <= 1e-5
    assert (ours - logits(tiny_model("llama"), ids)).abs().max() > 1e-3


def test_bad_input(pair, tmp_path):
    _, paths = pair
    with pytest.raises(PeftkitError, match="lm_head.weight' is missing from the fine-tune"):
        compress(paths["llama"][0], paths["gpt2"][1], str(tmp_path / "o"), rank=2)
    from transformers import AutoModelForCausalLM, LlamaConfig

    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "wide")
    with pytest.raises(PeftkitError, match=r"'model.layers.0.mlp.down_proj.weight' has shape \(32, 64\) in the base but \(32, 48\)"):
        compress(paths["llama"][0], str(tmp_path / "wide"), str(tmp_path / "o"), rank=2)
    for kwargs, needle in [({"rank": 0}, "positive"), ({"energy": 1.5}, r"\(0, 1\]"), ({"energy": 0.0}, r"\(0, 1\]"),
                           ({}, "exactly one"), ({"rank": 2, "energy": 0.5}, "exactly one")]:
        with pytest.raises(PeftkitError, match=needle):
            compress(*paths["llama"], str(tmp_path / "o"), **kwargs)
    assert not (tmp_path / "o").exists()
