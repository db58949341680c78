"""DoRA (LoRA's `use_dora`): equal to PEFT 0.21 in both directions (logits, training forward with dropout,
gradients), cached row norms equal to fresh ones, format checks."""

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

import peftkit
from peftkit.errors import PeftkitError
from tests.methods.dora_helpers import TARGETS, dora_model, perturb_dora, save_dora
from tests.tiny import logits, tiny_input, tiny_model, train_steps

KINDS = ["llama", "qwen2", "gpt2"]


@pytest.mark.parametrize("kind", KINDS)
def test_injected_dora_equals_base(kind):
    model, ids = tiny_model(kind), tiny_input()
    base = logits(model, ids)
    peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules=TARGETS[kind], use_dora=True))
    assert (logits(model, ids) - base).abs().max() <= 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_peft_loads_peftkit_dora(tmp_path, kind):
    model, ids = dora_model(kind), tiny_input()
    ours = logits(model, ids)
    assert (ours - logits(tiny_model(kind), ids)).abs().max() > 1e-3  # the adapter does something
    peftkit.save_adapter(model, tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["use_dora"] is True
    theirs = PeftModel.from_pretrained(tiny_model(kind), tmp_path / "ad")
    assert (logits(theirs, ids) - ours).abs().max() <= 1e-5
    n_saved = len(peftkit.io.adapters.read_adapter(tmp_path / "ad")[1])
    assert n_saved == sum(1 for n, _ in theirs.named_parameters() if "lora_" in n)  # A, B and m of every module


@pytest.mark.parametrize("kind", KINDS)
def test_peftkit_loads_peft_dora(tmp_path, kind):
    ids = tiny_input()
    config = PeftLoraConfig(r=4, lora_alpha=16, target_modules=TARGETS[kind], use_dora=True, use_rslora=kind == "qwen2",
                            fan_in_fan_out=kind == "gpt2")
    peft_model = get_peft_model(tiny_model(kind), config)
    perturb_dora(peft_model)
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    model = peftkit.load_adapter(tiny_model(kind), tmp_path / "peft")
    assert (logits(model, ids) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_training_forward_and_gradients_equal_peft_with_dropout(tmp_path, kind):
    """In training with dropout, W x is recomputed on the dropped-out input as PEFT does: same masks (same seed,
    same order of dropout calls), same loss, same gradients of A, B and m."""
    ids = tiny_input()
    ours = dora_model(kind, lora_dropout=0.3)
    peftkit.save_adapter(ours, tmp_path / "ad")
    theirs = PeftModel.from_pretrained(tiny_model(kind), tmp_path / "ad", is_trainable=True)
    losses, grads = [], []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(7)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({_common_name(n): p.grad
                      for n, p in model.named_parameters() if p.requires_grad})
    assert abs(losses[0] - losses[1]) <= 1e-6
    assert set(grads[0]) == set(grads[1]) and any("magnitude" in n for n in grads[0])
    for name, grad in grads[0].items():
        assert (grad - grads[1][name]).abs().max() <= 1e-5, name


def _common_name(name: str) -> str:
    """A parameter's name without PEFT's prefix, adapter name and the `.weight` of its magnitude module."""
    name = name.replace("base_model.model.", "").replace(".default", "")
    return name.removesuffix(".weight") if "magnitude" in name else name


def test_trainable_counts_equal_peft():
    model = tiny_model("llama")
    peftkit.inject(model, peftkit.LoraConfig(r=8, target_modules="all-linear", use_dora=True))
    peft_model = get_peft_model(tiny_model("llama"), PeftLoraConfig(r=8, target_modules="all-linear", use_dora=True))
    assert peftkit.trainable_parameters(model) == peft_model.get_nb_trainable_parameters()


def test_dora_trains_its_magnitude():
    model, ids = tiny_model("llama"), tiny_input()
    peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    layer = model.model.layers[0].self_attn.q_proj
    before = layer.lora_magnitude_vector["default"].detach().clone()
    first, last = train_steps(model, ids, steps=8)
    assert last < first
    assert not torch.equal(before, layer.lora_magnitude_vector["default"])


def _norm_calls(monkeypatch) -> list:
    import peftkit.methods.lora.layer as layer_module

    calls, real = [], layer_module.row_norm
    monkeypatch.setattr(layer_module, "row_norm", lambda *a: calls.append(1) or real(*a))
    return calls


def _uncached_logits(model, ids):
    """The forward with the norms recomputed: training mode with gradients (no dropout in these models)."""
    model.train()
    out = model(input_ids=ids).logits.detach()
    model.eval()
    return out


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_cached_norm_is_computed_once_and_equals_uncached(monkeypatch, kind):
    model, ids = dora_model(kind), tiny_input()
    calls = _norm_calls(monkeypatch)
    uncached = _uncached_logits(model, ids)
    layers = sum(1 for m in model.modules() if hasattr(m, "lora_magnitude_vector"))
    assert len(calls) == layers
    first = logits(model, ids)
    assert len(calls) == 2 * layers  # computed once per layer, then cached
    assert torch.equal(logits(model, ids), first) and len(calls) == 2 * layers  # reused
    assert (first - uncached).abs().max() <= 1e-6
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 4 and len(calls) == 2 * layers  # generate: no norm recomputed


def test_cache_follows_parameter_changes(monkeypatch):
    model, ids = dora_model("llama"), tiny_input()
    logits(model, ids)  # fill the cache
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(3.0)  # an in-place change (bumps the version counter)
    assert (logits(model, ids) - _uncached_logits(model, ids)).abs().max() <= 1e-6
    logits(model, ids)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()  # an optimizer step changes A and B in place
    model.eval()
    logits(model, ids)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    assert (logits(model, ids) - _uncached_logits(model, ids)).abs().max() <= 1e-6
    layer.base_layer.weight.data.mul_(1.5)  # through .data: invisible to the version counter ...
    model.eval()  # ... so the documented way to refresh is train() / eval()
    assert (logits(model, ids) - _uncached_logits(model, ids)).abs().max() <= 1e-6


def test_lora_bias_with_dora_is_refused():
    with pytest.raises(PeftkitError, match="use_dora cannot be combined with lora_bias"):
        peftkit.LoraConfig(use_dora=True, lora_bias=True)


def test_inconsistent_dora_files_are_refused(tmp_path):
    folder = save_dora("llama", tmp_path / "ad")
    cfg_file = folder / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "use_dora": False}))
    with pytest.raises(PeftkitError, match="lora_magnitude_vector tensors .* use_dora is false"):
        peftkit.load_adapter(tiny_model("llama"), folder)
    plain = tmp_path / "plain"
    model = tiny_model("llama")
    peftkit.inject(model, peftkit.LoraConfig(r=4))
    peftkit.save_adapter(model, plain)
    cfg_file = plain / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "use_dora": True}))
    with pytest.raises(PeftkitError, match="sets use_dora but module .* has no lora_magnitude_vector"):
        peftkit.load_adapter(tiny_model("llama"), plain)


def test_pissa_dora_exports_against_the_original_weights(tmp_path):
    """PiSSA keeps the residual in the base and exports rank 2r against the original W; DoRA's norm of W + sBA is
    the same either way, so PEFT loads the export on the untouched base model with the same logits."""
    model, ids = tiny_model("gpt2"), tiny_input()
    peftkit.inject(model, peftkit.LoraConfig(r=4, init="pissa", use_dora=True, target_modules="all-linear"))
    assert (logits(model, ids) - logits(tiny_model("gpt2"), ids)).abs().max() <= 1e-5
    perturb_dora(model)
    peftkit.save_adapter(model, tmp_path / "ad")
    theirs = PeftModel.from_pretrained(tiny_model("gpt2"), tmp_path / "ad")
    assert (logits(theirs, ids) - logits(model, ids)).abs().max() <= 1e-5


def test_row_norm_stays_fp32_under_autocast():
    from peftkit.methods.lora.dora import row_norm

    g = torch.Generator().manual_seed(0)
    w, a, b = (torch.randn(*s, generator=g) for s in ((48, 40), (4, 40), (48, 4)))
    want = torch.linalg.vector_norm(w + 0.5 * (b @ a), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = row_norm(w, False, a, b, 0.5)
    assert got.dtype == torch.float32 and (got - want).abs().max() <= 1e-5
    assert torch.allclose(row_norm(w.T.contiguous(), True, a, b, 0.5), want, atol=1e-5)  # Conv1D layout
