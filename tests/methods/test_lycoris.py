"""LoKr and LoHa (peftkit/methods/lokr.py, loha.py on lycoris.py) against HF PEFT 0.21.2: each loads the other's
files with equal logits, merges to PEFT's merge_and_unload weights, and counts the same trainable parameters;
GPT-2's Conv1D (which PEFT refuses for both) round-trips in peftkit; options arrive as `--set` gives them."""

from __future__ import annotations

import pytest
import torch
from peft import LoHaConfig as PeftLoha
from peft import LoKrConfig as PeftLokr
from peft import PeftModel, get_peft_model
from peft.tuners.lokr.layer import factorization as peft_factorization

import peftkit
from peftkit.core.counting import count_parameters
from peftkit.core.registry import get_method
from peftkit.errors import PeftkitError
from peftkit.methods.lokr import factorization
from tests.tiny import logits, perturb_adapter, tiny_config, tiny_input, tiny_model, train_steps

OURS = {"lokr": peftkit.LokrConfig, "loha": peftkit.LohaConfig}
PEFT = {"lokr": PeftLokr, "loha": PeftLoha}

CASES = [  # (method, architecture, options): the tiny families, the LoKr shapes, patterns and layer selection
    ("lokr", "llama", {"target_modules": ["q_proj", "v_proj"]}),
    ("lokr", "qwen2", {"target_modules": "all-linear", "decompose_both": True, "r": 1}),
    ("lokr", "gemma", {"target_modules": ["o_proj", "down_proj"], "decompose_factor": 4, "alpha": 3.0,
                       "layers_to_transform": [1]}),
    ("loha", "mistral", {"target_modules": "all-linear"}),
    ("loha", "qwen2", {"target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 2},
                       "alpha_pattern": {"v_proj": 5.0}}),
    ("loha", "gemma", {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [0]}),
]


def adapted(method: str, kind: str, options: dict) -> torch.nn.Module:
    """A tiny model with a peftkit adapter of `method` whose factors are random (zeros would hide lost tensors)."""
    model = tiny_model(kind)
    peftkit.inject(model, OURS[method](**{"r": 4, **options}))
    perturb_adapter(model, scale=0.3)
    return model


@pytest.mark.parametrize("method,kind,options", CASES)
def test_peft_loads_peftkit_adapter_and_merges_alike(tmp_path, method, kind, options):
    model, ids = adapted(method, kind, options), tiny_input()
    ours = logits(model, ids)
    peftkit.save_adapter(model, tmp_path / "ad")
    assert torch.equal(logits(peftkit.load_adapter(tiny_model(kind), tmp_path / "ad"), ids), ours)
    theirs = PeftModel.from_pretrained(tiny_model(kind), tmp_path / "ad")
    assert (logits(theirs, ids) - ours).abs().max() <= 1e-5
    saved = peftkit.io.adapters.read_adapter(tmp_path / "ad")[1]
    assert len(saved) == sum(1 for n, _ in theirs.named_parameters() if "lokr_" in n or "hada_" in n)
    assert (ours - logits(tiny_model(kind), ids)).abs().max() > 1e-3  # the adapter does change the model
    merged, their_merged = peftkit.merge(model).state_dict(), theirs.merge_and_unload().state_dict()
    assert merged.keys() == their_merged.keys()
    assert max((merged[k] - their_merged[k]).abs().max().item() for k in merged) <= 1e-6


@pytest.mark.parametrize("method", ["lokr", "loha"])
def test_peftkit_loads_peft_adapter(tmp_path, method):
    ids = tiny_input()
    extra = {"decompose_both": True, "r": 2} if method == "lokr" else {}
    peft_model = get_peft_model(tiny_model("qwen2"), PEFT[method](
        **{"r": 4, "alpha": 6, "target_modules": ["q_proj", "v_proj", "down_proj"], "task_type": "CAUSAL_LM", **extra}))
    perturb_adapter(peft_model, scale=0.3)
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    model = peftkit.load_adapter(tiny_model("qwen2"), tmp_path / "peft")
    assert (logits(model, ids) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("method,kind,targets", [("lokr", "llama", "all-linear"), ("lokr", "mistral", ["q_proj"]),
                                                 ("loha", "llama", ["q_proj", "v_proj"]), ("loha", "qwen2", "all-linear")])
def test_trainable_counts_equal_peft(method, kind, targets):
    ours = count_parameters(tiny_config(kind), method, rank=8, target_modules=targets)  # meta device
    theirs = get_peft_model(tiny_model(kind), PEFT[method](r=8, target_modules=targets)).get_nb_trainable_parameters()
    assert ours == theirs


@pytest.mark.parametrize("method", ["lokr", "loha"])
def test_gpt2_conv1d_round_trips_merges_and_unmerges(tmp_path, method):
    """Conv1D stores W as [in, out]: ΔW is added transposed (checked against the forward). PEFT refuses it."""
    model, ids = adapted(method, "gpt2", {"target_modules": ["c_attn", "c_fc"]}), tiny_input()
    ours = logits(model, ids)
    peftkit.save_adapter(model, tmp_path / "ad")
    assert torch.equal(logits(peftkit.load_adapter(tiny_model("gpt2"), tmp_path / "ad"), ids), ours)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peftkit.merge_adapter(model)
    assert (logits(model, ids) - ours).abs().max() <= 1e-5
    peftkit.unmerge_adapter(model)
    assert all((model.state_dict()[k] - v).abs().max() <= 1e-6 for k, v in before.items())
    with pytest.raises(TypeError, match="Conv1D"):
        get_peft_model(tiny_model("gpt2"), PEFT[method](target_modules=["c_attn"]))


@pytest.mark.parametrize("method", ["lokr", "loha"])
def test_starts_as_base_and_trains_with_dropouts(method):
    """Default init leaves the model unchanged; rank and module dropout act only while training."""
    model, ids = tiny_model("llama"), tiny_input()
    base = logits(model, ids)
    peftkit.inject(model, OURS[method](r=4, rank_dropout=0.5, module_dropout=0.1))
    assert torch.equal(logits(model, ids), base)
    first, last = train_steps(model, ids, steps=4)
    assert last < first
    assert torch.equal(logits(model, ids), logits(model, ids))  # eval: no dropout


def test_lokr_shapes_follow_factorization_and_init():
    assert all(factorization(d, f) == peft_factorization(d, f) for d in range(1, 200) for f in (-1, 1, 3, 4, 16))
    model = tiny_model("llama")  # q_proj 32 x 32: 4 x 8 blocks; r = 2 < 8 / 2 splits W2, decompose_both W1 too
    peftkit.inject(model, peftkit.LokrConfig(r=2, decompose_both=True, init_weights="lycoris", target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    shapes = {k: tuple(v.shape) for k, v in layer.factors("default").items()}
    assert shapes == {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}  # 4 < 4 / 2 is false: W1 full
    assert not layer.lokr_w2_b["default"].any() and layer.lokr_w1["default"].any()  # "lycoris": W2 starts at 0


def test_options_as_set_gives_them_and_bad_values_are_one_line():
    config = get_method("lokr").build_config({"rank": 4, "alpha": "2", "decompose_both": "true",
                                              "init_weights": "lycoris", "rank_dropout": "0.1"})
    assert (config.r, config.alpha, config.decompose_both, config.init_weights, config.rank_dropout) == (
        4, 2.0, True, "lycoris", 0.1)
    assert get_method("loha").build_config({"r": 16}).alpha == 8.0  # PEFT's default alpha
    for method, options, message in [("lokr", {"decompose_factor": 0}, "decompose_factor"),
                                     ("loha", {"init_weights": "lycoris"}, "init_weights"),
                                     ("loha", {"module_dropout": 1.5}, "module_dropout"),
                                     ("lokr", {"dropout": 0.1}, "no option 'dropout'")]:
        with pytest.raises(PeftkitError, match=message) as err:
            get_method(method).build_config(options)
        assert "\n" not in str(err.value)


def test_refuses_a_module_another_method_wraps():
    model = tiny_model("llama")
    peftkit.inject(model, peftkit.LoraConfig(r=2), "lora")
    with pytest.raises(PeftkitError, match="already holds a LoraLayer"):
        peftkit.inject(model, peftkit.LohaConfig(r=2), "loha")
