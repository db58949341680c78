"""GRPO's loss and adapter gradients equal TRL's GRPOTrainer loss computation (TRL 1.16) for each loss_type, on a
fixed batch of prompts, completions, advantages and old log-probabilities; the advantages equal TRL's formula."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.core.ops import disable_adapters
from peftkit.train.objectives import grpo_loss as gl
from tests.tiny import perturb_adapter, save_tiny_checkpoint

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

TEMPERATURE, G, C = 0.7, 3, 5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(PEFT LoRA model, peftkit LoRA model with the same weights, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.0))
    perturb_adapter(theirs, scale=0.3)
    adapter = tmp_path_factory.mktemp("adapter")
    theirs.save_pretrained(adapter)
    ours = peftkit.load_adapter(AutoModelForCausalLM.from_pretrained(folder), adapter)
    return theirs, ours, AutoTokenizer.from_pretrained(folder)


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    """2 prompts x G completions: left-padded prompts of different lengths, completions ended early (mask 0)."""
    g = torch.Generator().manual_seed(0)
    n = 2 * G
    prompt_ids = torch.randint(5, vocab, (n, 6), generator=g)
    prompt_mask = torch.ones(n, 6, dtype=torch.long)
    prompt_mask[G:, :2] = 0
    completion_ids = torch.randint(5, vocab, (n, C), generator=g)
    completion_mask = torch.ones(n, C, dtype=torch.long)
    completion_mask[1, 3:] = 0
    completion_mask[4, 1:] = 0
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.2, 0.9])
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": gl.group_advantages(rewards, G)[0]}


def _trl_advantages(rewards: torch.Tensor, scale: str) -> torch.Tensor:
    """TRL's sum_then_normalize advantages, as written in GRPOTrainer._generate_and_score_completions."""
    from trl.trainer.utils import nanstd

    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G)
    std = nanstd(rewards).expand_as(rewards) if scale == "batch" else \
        nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G)
    advantages = rewards - mean
    return advantages / (std + 1e-4) if scale != "none" else advantages


@pytest.mark.parametrize("scale", gl.SCALE_REWARDS)
def test_advantages_equal_trl(scale):
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.2, 0.9, 3.0, 3.0, 3.0])
    torch.testing.assert_close(gl.group_advantages(rewards, G, scale)[0], _trl_advantages(rewards, scale))


def _trainer(model, tokenizer, tmp_path, **config):
    from datasets import Dataset

    args = trl.GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=2 * G,
                          num_generations=G, temperature=TEMPERATURE, bf16=False, **config)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions),
                              args=args, train_dataset=Dataset.from_dict({"prompt": ["x"] * (2 * G)}),
                              processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    if "ref" in model.peft_config:  # TRL's copy of a given adapter as its reference; ours is the adapter switched off
        model.delete_adapter("ref")
    return trainer


def _grads(model) -> dict[str, torch.Tensor]:
    return {n.removeprefix("base_model.model."): p.grad.clone() for n, p in model.named_parameters()
            if p.requires_grad}


@pytest.mark.parametrize("loss_type", gl.LOSS_TYPES)
def test_loss_and_gradients_equal_trl(models, tmp_path, loss_type):
    theirs, ours, tokenizer = models
    settings = gl.LossSettings(loss_type=loss_type, epsilon=0.2, epsilon_high=0.28, beta=0.05,
                               max_completion_length=C)
    trainer = _trainer(theirs, tokenizer, tmp_path, loss_type=loss_type, epsilon=settings.epsilon,
                       epsilon_high=settings.epsilon_high, beta=settings.beta, max_completion_length=C)
    batch = _batch(ours.config.vocab_size)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        current, _ = gl.completion_logps(ours, batch, TEMPERATURE)
        with disable_adapters(ours):
            ref, _ = gl.completion_logps(ours, batch, TEMPERATURE)
        with theirs.disable_adapter():
            trl_ref = trainer._get_per_token_logps_and_entropies(theirs, ids, mask, C)[0]
    kept = batch["completion_mask"].bool()  # TRL scores masked positions as 0
    torch.testing.assert_close(ref[kept], trl_ref[kept], atol=1e-5, rtol=1e-5)
    old = current + torch.randn(current.shape, generator=torch.Generator().manual_seed(3)) * 0.3  # clips some
    theirs.zero_grad()
    theirs.train()
    expected = trainer.compute_loss(theirs, {**batch, "old_per_token_logps": old, "ref_per_token_logps": trl_ref,
                                             "num_items_in_batch": batch["completion_mask"].sum()})
    expected.backward()
    ours.zero_grad()
    logps, _ = gl.completion_logps(ours, batch, TEMPERATURE)
    losses = gl.token_losses(logps, old, ref, batch["advantages"], batch["completion_mask"], settings)
    total, count = gl.reduce(losses, settings)
    loss = total / count
    loss.backward()
    assert float(gl.clip_fractions(losses, settings)["clip_ratio/region_mean"]) > 0  # the batch exercises clipping
    torch.testing.assert_close(loss, expected.detach(), atol=1e-5, rtol=1e-5)
    want, got = _grads(theirs), _grads(ours)
    assert want.keys() == got.keys()
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, atol=1e-5, rtol=1e-4, msg=name)
