"""KTO: the loss equals TRL's KTOTrainer (values and gradients, fp32), the data rows and their KL partners, and a
tiny model trained with `--objective kto` raises its held-out preference accuracy."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import peftkit
from peftkit.data.unpaired import collate_unpaired, tokenize_unpaired
from peftkit.errors import PeftkitError
from peftkit.train.config import load_train_config, resolve_defaults
from peftkit.train.objectives.kto_loss import KtoStep, kto_loss, precompute_reference
from peftkit.train.run import train
from tests.tiny import save_tiny_checkpoint

ROWS = [{"prompt": "Capital of France?", "completion": "Paris", "label": True},
        {"prompt": "2 + 2?", "completion": "5, I think", "label": False},
        {"prompt": "Colour of the sky?", "completion": "Blue on a clear day", "label": True},
        {"prompt": "Largest planet?", "completion": "The Moon", "label": False}]


def _trl_loss(model, batch: dict, beta: float, weights: tuple[float, float]) -> torch.Tensor:
    """TRL's KTOTrainer._compute_loss on our batch, with the reference precomputed (TRL's layout: completion_mask
    marks the completion tokens; `model` answers TRL's fused-head call with per-token log-probs)."""
    from trl.trainer.kto_trainer import KTOTrainer

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != -100).long(), "KL_input_ids": batch["kl_input_ids"],
              "KL_attention_mask": batch["kl_attention_mask"],
              "KL_completion_mask": (batch["kl_labels"] != -100).long(), "label": batch["desirable"],
              "ref_logps": batch["ref_logps"], "ref_KL_logps": batch["ref_kl_logps"]}
    trainer = SimpleNamespace(model=SimpleNamespace(training=True), calculate_KL=True, precompute_ref_logps=True,
                              beta=beta, loss_type="kto", desirable_weight=weights[0], undesirable_weight=weights[1],
                              accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
                              _metrics={"train": defaultdict(list)}, aux_loss_enabled=False, _total_train_tokens=0,
                              _tp_size=1)
    trainer._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(trainer, m, b)
    return KTOTrainer._compute_loss(trainer, model, inputs, False)


class FusedHead(torch.nn.Module):
    """A causal LM answering TRL's `model(..., labels=..., fused_lm_head=True)`: per-token log-probs of the labels
    (0 where masked), entropy and mean logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels, fused_lm_head=True, use_cache=False):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        targets = labels[:, 1:]
        logps = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        logps = logps * (targets != -100)
        return SimpleNamespace(log_probs=logps, entropy=torch.zeros_like(logps), mean_logits=logits.mean(-1))


class Preset(torch.nn.Module):
    """A 'model' returning given per-row log-prob sums: rows of KL ids (all 1) get `kl`, the others `own`."""

    def __init__(self, own: torch.Tensor, kl: torch.Tensor):
        super().__init__()
        self.own, self.kl = own, kl

    def forward(self, input_ids, attention_mask, labels, fused_lm_head=True, use_cache=False):
        sums = self.kl if bool((input_ids == 1).all()) else self.own
        logps = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1)
        logps[:, 0] = sums
        return SimpleNamespace(log_probs=logps, entropy=torch.zeros_like(logps), mean_logits=torch.zeros_like(logps))


@pytest.mark.parametrize("kl_shift", [0.8, -0.8])  # a positive KL estimate, and one clamped at 0
def test_formula_equals_trl(kl_shift):
    pytest.importorskip("trl")
    pi, ref = torch.tensor([-3.0, -5.0, -2.0, -7.5]), torch.tensor([-3.4, -4.1, -2.9, -6.0])
    ref_kl = torch.tensor([-9.0, -8.0, -7.0, -6.5])
    pi_kl = ref_kl + kl_shift + torch.tensor([0.1, -0.1, 0.2, -0.2])
    desirable = torch.tensor([True, False, True, False])
    ids = torch.zeros(4, 3, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "kl_input_ids": ids + 1,
             "kl_attention_mask": torch.ones_like(ids), "kl_labels": ids + 1, "desirable": desirable,
             "ref_logps": ref, "ref_kl_logps": ref_kl}
    want = _trl_loss(Preset(pi, pi_kl), batch, beta=0.5, weights=(1.3, 0.6))
    losses, rewards, z0 = kto_loss(pi, ref, pi_kl, ref_kl, desirable, 0.5, 1.3, 0.6)
    assert float(z0) == pytest.approx(max(kl_shift, 0.0), abs=1e-6)
    assert float(losses.mean()) == pytest.approx(float(want), abs=1e-6)
    by_hand = [1.3 * (1 - 1 / (1 + math.exp(-0.5 * (0.4 - float(z0))))),
               0.6 * (1 - 1 / (1 + math.exp(-0.5 * (float(z0) + 0.9))))]
    assert [float(losses[0]), float(losses[1])] == pytest.approx(by_hand, abs=1e-6)
    assert torch.allclose(rewards, 0.5 * (pi - ref))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama with a LoRA adapter whose B is random (policy != reference) and the four rows tokenized."""
    folder = save_tiny_checkpoint(tmp_path_factory.mktemp("kto") / "tiny")
    model, tokenizer = peftkit.load_model(str(folder))
    torch.manual_seed(0)
    peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    data = tokenize_unpaired(ROWS, tokenizer, max_length=64, prompt_format={"chat_template": tokenizer.chat_template})
    return model, data


def test_data_rows_and_kl_partners(tiny):
    _, data = tiny
    assert data.desirable == [True, False, True, False] and len(data.references) == 2
    for i in range(4):  # the KL row: this prompt, the previous row's completion (the last's for the first)
        partner = (i - 1) % 4
        own_targets = [t for t in data.labels[partner] if t != -100]
        assert [t for t in data.kl_labels[i] if t != -100] == own_targets
        assert data.kl_ids[i][:5] == data.ids[i][:5]
    with pytest.raises(PeftkitError, match="'label' must be true"):
        tokenize_unpaired([{"prompt": "a", "completion": "b", "label": "yes"}], None, max_length=8, prompt_format={})


def test_loss_and_gradients_equal_trl(tiny):
    pytest.importorskip("trl")
    model, data = tiny
    model.eval()
    indices = [0, 1, 2, 3]
    precompute_reference(model, data, [indices], lambda idx: collate_unpaired(data, idx, 0), path="full")
    batch = collate_unpaired(data, indices, 0)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    step = KtoStep(0.3, model, desirable_weight=1.2, undesirable_weight=0.8)
    ours = step(model, batch, "full") / 4
    ours.backward()
    our_grads = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad()
    theirs = _trl_loss(FusedHead(model), batch, beta=0.3, weights=(1.2, 0.8))
    theirs.backward()
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), abs=1e-5)
    assert step.stats()["kl"] >= 0.0
    for name, grad in our_grads.items():
        assert torch.allclose(grad, params[name].grad, atol=1e-5), name
    assert max(float(g.abs().max()) for g in our_grads.values()) > 1e-4
    model.zero_grad()
    data.ref_logps = data.ref_kl_logps = None


def test_in_step_reference_is_the_adapter_switched_off(tiny):
    model, data = tiny
    batch = collate_unpaired(data, [0, 1, 2, 3], 0)
    with torch.no_grad():
        in_step = KtoStep(0.3, model).reference(model, batch, "full")
        precompute_reference(model, data, [[0, 1], [2, 3]], lambda idx: collate_unpaired(data, idx, 0), "full")
    assert torch.allclose(in_step[0], torch.tensor(data.ref_logps), atol=1e-5)
    assert torch.allclose(in_step[1], torch.tensor(data.ref_kl_logps), atol=1e-5)
    data.ref_logps = data.ref_kl_logps = None


def _write_rows(path, n: int, offset: int = 0, both: bool = False):
    """A task a tiny model learns in a few steps: GOOD words are desirable, BAD ones undesirable."""
    good, bad = ["alpha", "beta", "gamma", "delta"], ["wrong", "nope", "error", "never"]
    with path.open("w") as f:
        for i in range(offset, offset + n):
            label = both or i % 2 == 0
            f.write(json.dumps({"prompt": f"Answer number {i}?", "completion": good[i % 4], "label": True}) + "\n"
                    if label else "")
            if both or not label:
                f.write(json.dumps({"prompt": f"Answer number {i}?", "completion": bad[(i * 3) % 4],
                                    "label": False}) + "\n")
    return path


def test_training_raises_held_out_preference_accuracy(tmp_path):
    model = save_tiny_checkpoint(tmp_path / "tiny")
    data, held = _write_rows(tmp_path / "train.jsonl", 32), _write_rows(tmp_path / "eval.jsonl", 6, 100, both=True)
    options = dict(model=str(model), data=str(data), eval_data=str(held), objective="kto", max_steps=6,
                   batch_size=4, max_length=64, lr=3e-2, rank=4, dropout=0.0, precision="fp32", seed=0, warmup=0,
                   output=str(tmp_path / "run"), eval_examples=12)
    result = train(load_train_config(None, options), progress=False)
    before, after = result.before, result.after
    assert before["rewards/accuracies"] == 0.0 and before["loss"] == pytest.approx(0.5, abs=1e-6)
    assert before["compared"] == after["compared"] == 6
    assert after["preference_accuracy"] > before["preference_accuracy"] and after["preference_accuracy"] >= 0.8
    assert after["rewards/accuracies"] > 0.5 and after["rewards/margins"] > before["rewards/margins"] == 0.0
    records = [json.loads(line) for line in result.run_dir.metrics.read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, 7)) and steps[0]["examples"] == 4
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
        assert all(math.isfinite(r[key]) for r in steps), key


def test_options_defaults_and_refusals():
    kto = resolve_defaults(load_train_config(None, {"objective": "kto"}))
    assert kto.objective_options == {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0,
                                     "precompute_ref": False}
    assert (kto.max_steps, kto.batch_size) == (30, 8)
    assert kto.to_dict()["desirable_weight"] == 1.0 and "objective_options" not in kto.to_dict()
    for options, message in [({"objective": "kto", "batch_size": 1}, "needs --batch-size >= 2"),
                             ({"objective": "kto", "method": "full"}, "KTO with --method full needs --precompute-ref"),
                             ({"objective": "kto", "packing": True}, "--packing does not work with --objective kto"),
                             ({"objective": "kto", "desirable_weight": 0}, "desirable_weight must be > 0"),
                             ({"desirable_weight": 2.0}, "--desirable-weight is an option of kto; add --objective kto")]:
        with pytest.raises(PeftkitError, match=message):
            load_train_config(None, options)


def test_the_wrong_rows_are_refused(tmp_path):
    model = save_tiny_checkpoint(tmp_path / "tiny")
    data = _write_rows(tmp_path / "rows.jsonl", 4)
    with pytest.raises(PeftkitError, match="train on them with --objective kto"):
        train(load_train_config(None, {"model": str(model), "data": str(data), "output": str(tmp_path / "a")}),
              progress=False)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(PeftkitError, match="the data has preference rows .* train on them with --objective dpo"):
        train(load_train_config(None, {"model": str(model), "data": str(pairs), "objective": "kto",
                                       "output": str(tmp_path / "b")}), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
