"""GRPO's loss (Shao et al. 2024), with TRL's names and semantics (GRPOTrainer._compute_loss, TRL 1.16).

A step's completions come in groups of G per prompt. Rewards r (the weighted sum of the reward functions) become
group-normalised advantages (`group_advantages`, TRL's `scale_rewards`):

    A = r - mean(r of the group)          then / (std + 1e-4): std of the group ("group"), of the whole batch
                                          ("batch"), or no scaling ("none", Dr. GRPO)

For each completion token t, with pi the policy's log-prob (logits / temperature, as TRL scores them), old the
log-prob when sampled and ref the reference's (the model with its adapter switched off):

    ratio = exp(pi - old)                 clipped to [1 - epsilon, 1 + epsilon_high]
    loss_t = -min(ratio * A, clip(ratio) * A) + beta * ratio * (exp(ref - pi) - (ref - pi) - 1)

(the KL estimate times the ratio: TRL's `use_bias_correction_kl`, on by default; off, the plain k3 estimate)

and the token losses become one number by `loss_type` (`reduce`): "grpo" the mean over completions of each one's
token mean; "bnpo" the token mean of each micro-batch; "dr_grpo" the token sum over (completions x
max_completion_length); "dapo" (TRL's default) the token mean over the whole step. The loop divides a micro-batch's
SUM by the step's `count` (loop/fit.py), so `reduce` returns (sum, count) with: grpo (sum of token means,
completions), bnpo (token mean, 1: one per micro-batch), dr_grpo (token sum / max_completion_length, completions),
dapo (token sum, tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# TRL's loss_type names (named here: tests/train/test_objective_names.py keeps the literal "grpo" to its module)
DAPO, GRPO, BNPO, DR_GRPO = "dapo", "grpo", "bnpo", "dr_grpo"
LOSS_TYPES = (DAPO, GRPO, BNPO, DR_GRPO)
SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, group: int, scale: str = "group") -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [N], whether each completion's std is zero [N]) from rewards [N], consecutive groups of `group`
    completions of one prompt; `scale` is TRL's scale_rewards (std: unbiased, as TRL's nanstd)."""
    grouped = rewards.view(-1, group)
    mean = grouped.mean(1).repeat_interleave(group)
    if scale == "batch":
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        std = grouped.std(1).repeat_interleave(group) if group > 1 else torch.zeros_like(rewards)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return advantages, torch.isclose(std, torch.zeros_like(std))


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over the attention mask (left padding skipped), as generate() computes them."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_logps(model: nn.Module, batch: dict[str, torch.Tensor], temperature: float,
                     entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs [B, C] of the completion tokens under logits / temperature, their entropies [B, C] or None).
    batch: prompt_ids / prompt_mask [B, P] (left-padded), completion_ids / completion_mask [B, C]."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    width = batch["completion_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False,
                   logits_to_keep=width + 1).logits[:, :-1].float() / temperature
    logps = F.log_softmax(logits, -1)
    chosen = logps.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    if not entropy:
        return chosen, None
    with torch.no_grad():
        return chosen, -(logps.exp() * logps).sum(-1)


@dataclass(frozen=True)
class LossSettings:
    """TRL's GRPOConfig fields the loss reads."""

    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = None     # None: epsilon
    beta: float = 0.0
    max_completion_length: int = 512
    use_bias_correction_kl: bool = True   # the KL term times the ratio (TRL's default since 1.x)

    @property
    def high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


@dataclass
class TokenLosses:
    """The token losses of a micro-batch and what the statistics need (all [B, C] but `advantages` [B, 1])."""

    loss: torch.Tensor
    mask: torch.Tensor
    ratio: torch.Tensor
    advantages: torch.Tensor
    kl: torch.Tensor | None


def token_losses(logps: torch.Tensor, old: torch.Tensor | None, ref: torch.Tensor | None, advantages: torch.Tensor,
                 mask: torch.Tensor, s: LossSettings) -> TokenLosses:
    """The clipped surrogate plus beta times the k3 KL estimate, per completion token (module docstring).
    old None: the policy itself (a single update per rollout: the ratio is 1 with the policy's gradient)."""
    old = logps.detach() if old is None else old
    ratio = torch.exp(logps - old)     # with gradient: TRL's coef_1
    adv = advantages.unsqueeze(1)
    clipped = torch.clamp(ratio, 1 - s.epsilon, 1 + s.high)
    loss = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if s.beta != 0.0:
        assert ref is not None, "beta > 0 needs the reference's log-probs"
        kl = torch.exp(ref - logps) - (ref - logps) - 1
        loss = loss + s.beta * (kl * ratio if s.use_bias_correction_kl else kl)
    return TokenLosses(loss, mask.to(loss.dtype), ratio.detach(), adv, None if kl is None else kl.detach())


def reduce(t: TokenLosses, s: LossSettings) -> tuple[torch.Tensor, int]:
    """(the micro-batch's share of the step's loss, what the step divides it by): see the module docstring."""
    masked = t.loss * t.mask
    if s.loss_type == GRPO:
        total = (masked.sum(-1) / t.mask.sum(-1).clamp(min=1.0)).sum()
    elif s.loss_type == BNPO:
        total = masked.sum() / t.mask.sum().clamp(min=1.0)
    elif s.loss_type == DR_GRPO:
        total = masked.sum() / s.max_completion_length
    else:
        total = masked.sum()
    return total, count(t.mask, s)


def count(mask: torch.Tensor, s: LossSettings) -> int:
    """What the step divides a micro-batch's `reduce` by, from its completion mask [B, C] (module docstring)."""
    if s.loss_type in (GRPO, DR_GRPO):
        return mask.shape[0]
    return 1 if s.loss_type == BNPO else int(mask.sum())


def clip_fractions(t: TokenLosses, s: LossSettings) -> dict[str, torch.Tensor]:
    """Sums over completion tokens of TRL's clip indicators (low: ratio below 1 - epsilon with A < 0; high: above
    1 + epsilon_high with A > 0; region: either); divide by the tokens for TRL's clip_ratio means."""
    low = (t.ratio < 1 - s.epsilon) & (t.advantages < 0)
    high = (t.ratio > 1 + s.high) & (t.advantages > 0)
    return {"clip_ratio/low_mean": (low * t.mask).sum(), "clip_ratio/high_mean": (high * t.mask).sum(),
            "clip_ratio/region_mean": ((low | high) * t.mask).sum()}
