"""The preference losses against their papers' definitions, hand-computed on a fixed batch, and against TRL 1.16's
ORPO and SimPO implementations on the same log-probs; the step on a tiny model: DPO starts at ln 2 when the
adapter starts as the identity, the reference is the base model, precomputed and in-step references agree."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import peftkit
from peftkit.core.ops import disable_adapters
from peftkit.data.preference import collate_pairs, tokenize_pairs
from peftkit.train.objectives import get_objective
from peftkit.train.objectives.pairs_run import precompute_reference
from peftkit.train.objectives.preference_loss import dpo_loss, log1mexp, orpo_loss, sequence_logps, simpo_loss
from tests.tiny import save_tiny_checkpoint

# A fixed batch of two pairs: policy / reference log-prob sums and response lengths.
PI_C, PI_R = torch.tensor([-5.0, -8.0]), torch.tensor([-7.0, -6.0])
REF_C, REF_R = torch.tensor([-6.0, -7.5]), torch.tensor([-6.5, -6.5])
N_C, N_R = torch.tensor([4.0, 5.0]), torch.tensor([5.0, 3.0])


def _softplus(x: float) -> float:  # -log sigmoid(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


def test_dpo_by_hand():
    losses, chosen, rejected = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1)
    # pair 0: beta * ((-5 + 6) - (-7 + 6.5)) = 0.1 * 1.5; pair 1: 0.1 * ((-8 + 7.5) - (-6 + 6.5)) = 0.1 * -1.0
    assert losses.tolist() == pytest.approx([_softplus(-0.15), _softplus(0.1)], abs=1e-6)
    assert losses.tolist() == pytest.approx([0.62096, 0.74440], abs=1e-5)
    assert chosen.tolist() == pytest.approx([0.1, -0.05]) and rejected.tolist() == pytest.approx([-0.05, 0.05])


def test_orpo_by_hand():
    losses, chosen, rejected = orpo_loss(PI_C, PI_R, N_C, N_R, lam=0.25)
    want = []
    for a_c, a_r in [(-5 / 4, -7 / 5), (-8 / 5, -6 / 3)]:  # length-averaged log-probs
        log_odds = (a_c - a_r) - (math.log(1 - math.exp(a_c)) - math.log(1 - math.exp(a_r)))
        want.append(-a_c + 0.25 * _softplus(-log_odds))   # NLL of chosen (mean per token) + lambda * OR term
    assert losses.tolist() == pytest.approx(want, abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.25 * -1.25, 0.25 * -1.6])
    assert rejected.tolist() == pytest.approx([0.25 * -1.4, 0.25 * -2.0])


def test_simpo_by_hand():
    losses, chosen, rejected = simpo_loss(PI_C, PI_R, N_C, N_R, beta=2.0, gamma=1.0)
    # pair 0: 2 * -5/4 - 2 * -7/5 - 1 = -0.7; pair 1: 2 * -8/5 - 2 * -6/3 - 1 = -0.2
    assert losses.tolist() == pytest.approx([_softplus(0.7), _softplus(0.2)], abs=1e-6)
    assert chosen.tolist() == pytest.approx([-2.5, -3.2]) and rejected.tolist() == pytest.approx([-2.8, -4.0])


def test_log1mexp_is_accurate_at_both_ends():
    x = torch.tensor([-1e-6, -0.1, -0.7, -5.0, -50.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x), torch.tensor([math.log(-math.expm1(v)) for v in x.tolist()],
                                                    dtype=torch.float64), rtol=1e-9)


def test_orpo_and_simpo_match_trl():
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    device = SimpleNamespace(device="cpu")
    avg_c, avg_r = PI_C / N_C, PI_R / N_R
    trl_or, trl_c, trl_r, _, _ = ORPOTrainer.odds_ratio_loss(SimpleNamespace(beta=0.25, accelerator=device),
                                                              avg_c, avg_r)
    ours, chosen, rejected = orpo_loss(PI_C, PI_R, N_C, N_R, lam=0.25)
    assert torch.allclose(ours, -avg_c - trl_or, atol=1e-6)  # TRL: loss = NLL - mean(beta * logsigmoid(log odds))
    assert torch.allclose(chosen, trl_c) and torch.allclose(rejected, trl_r)
    cpo = SimpleNamespace(beta=2.0, simpo_gamma=1.0, loss_type="simpo", label_smoothing=0.0, alpha=0.0,
                          accelerator=device)
    trl_simpo, trl_c, trl_r = CPOTrainer.cpo_loss(cpo, avg_c, avg_r)
    ours, chosen, rejected = simpo_loss(PI_C, PI_R, N_C, N_R, beta=2.0, gamma=1.0)
    assert torch.allclose(ours, trl_simpo, atol=1e-6)
    assert torch.allclose(chosen, trl_c) and torch.allclose(rejected, trl_r)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama with a LoRA adapter (B = 0: the identity) and a batch of three text pairs."""
    folder = save_tiny_checkpoint(tmp_path_factory.mktemp("pref") / "tiny")
    model, tokenizer = peftkit.load_model(str(folder))
    torch.manual_seed(0)
    peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    rows = [{"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon, I think"},
            {"prompt": "2 + 2?", "chosen": "4", "rejected": "5"},
            {"prompt": "Colour of the sky?", "chosen": "Blue on a clear day", "rejected": "Green"}]
    pairs = tokenize_pairs(rows, tokenizer, max_length=64, prompt_format={"chat_template": tokenizer.chat_template})
    return model, pairs, collate_pairs(pairs, [0, 1, 2], tokenizer.pad_token_id)


def test_dpo_starts_at_ln2_with_an_identity_adapter(tiny):
    model, _, batch = tiny
    step = get_objective("dpo").step(model, {"beta": 0.1})
    loss = step(model, batch).detach() / 3
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
    stats = step.stats()
    assert stats["rewards/margins"] == pytest.approx(0.0, abs=1e-6) and stats["pairs"] == 3


def test_reference_is_the_base_model_and_precomputing_agrees(tiny):
    model, pairs, batch = tiny
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
        with disable_adapters(model):
            base, _ = sequence_logps(model, batch)
        adapted, _ = sequence_logps(model, batch)
        step = get_objective("dpo").step(model, {"beta": 0.1})
        assert torch.allclose(torch.cat(step.reference(batch, True)), base)
        assert not torch.allclose(adapted, base)
        in_step = step(model, batch)
        precompute_reference(model, pairs, [[0, 1], [2]], lambda idx: collate_pairs(pairs, idx, 0))
        assert torch.allclose(torch.tensor(pairs.ref_chosen + pairs.ref_rejected), base, atol=1e-5)
        precomputed = step(model, collate_pairs(pairs, [0, 1, 2], 0))
        assert float(in_step) == pytest.approx(float(precomputed), abs=1e-5)
        assert float(in_step) != pytest.approx(3 * math.log(2), abs=1e-3)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.zero_()
    pairs.ref_chosen = pairs.ref_rejected = None


def test_sequence_logps_with_and_without_logits_to_keep(tiny):
    model, _, batch = tiny
    with torch.no_grad():
        kept, n_kept = sequence_logps(model, batch, path="keep")
        full, n_full = sequence_logps(model, batch, path="full")
    assert torch.allclose(kept, full, atol=1e-5) and torch.equal(n_kept, n_full)
    assert (n_full > 0).all()
