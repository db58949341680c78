"""Preference losses (DPO, ORPO, SimPO) and the training step that computes them on a chosen + rejected batch.

A batch (peftkit.data.preference.collate_pairs) holds B chosen rows then B rejected rows, [2B, T], so ONE forward
scores both. For each row, `sequence_logps` gives the sum of log p(token | prefix) over its response tokens and
their number |y|. With pi_c, pi_r the policy's sums and ref_c, ref_r the reference's:

    DPO   (Rafailov et al. 2023):  -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
          rewards beta * (pi - ref)
    ORPO  (Hong et al. 2024):      -pi_c / |y_c|  +  lambda * -log sigmoid(log odds(c) - log odds(r))
          with a = pi / |y| (length-averaged) and log odds = a - log(1 - exp(a)); lambda is `beta`;
          rewards beta * a (as TRL logs them)
    SimPO (Meng et al. 2024):      -log sigmoid(beta * pi_c / |y_c| - beta * pi_r / |y_r| - gamma)
          rewards beta * pi / |y|

DPO's reference is the same model with its adapters switched off (`core.ops.disable_adapters`): no second copy.
It is computed in the same step under no_grad, or read from the batch (`ref_chosen` / `ref_rejected`, when
precomputed once over the dataset with --precompute-ref).

A micro-batch's loss is the SUM of its pairs' losses; the loop divides by the number of pairs in the whole step
(`count_pairs`), so every pair weighs the same however pairs fall into micro-batches and processes, like target
tokens in SFT (see loop.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.labels import IGNORE_INDEX
from peftkit.core.ops import disable_adapters
from peftkit.train.loop.loss import MODEL_INPUTS

Rewards = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # per-pair losses, chosen rewards, rejected rewards
STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
         "preference_accuracy")


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor],
                   path: str = "keep") -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probs of each row's target tokens [N], number of target tokens [N]).

    path: the run's loss path (`loss.loss_path`). Per-row sums need the logits, so "fused" reads as "keep":
    logits only where some row has a target (`logits_to_keep`); "full" everywhere."""
    labels = batch["labels"]                                  # [N, T]
    targets = labels[:, 1:]                                   # [N, T-1]
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if path != "full":
        keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        logits = model(**inputs, use_cache=False, logits_to_keep=keep - labels.shape[1]).logits  # [N, K, V]
        targets = targets[:, keep]
    else:
        logits = model(**inputs, use_cache=False).logits[:, -labels.shape[1]:-1]
    mask = targets != IGNORE_INDEX
    token_logps = -F.cross_entropy(logits.flatten(0, 1).float(), targets.clamp(min=0).flatten(),
                                   reduction="none").view_as(targets)
    return (token_logps * mask).sum(1), mask.sum(1)


def dpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
             beta: float) -> Rewards:
    """DPO on sequence log-prob sums (all [B])."""
    chosen, rejected = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x (Maechler 2012)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, n_c: torch.Tensor, n_r: torch.Tensor, lam: float) -> Rewards:
    """ORPO: the chosen response's mean token NLL plus lambda times the odds-ratio term."""
    avg_c, avg_r = pi_c / n_c, pi_r / n_r
    log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
    return -avg_c - lam * F.logsigmoid(log_odds), lam * avg_c.detach(), lam * avg_r.detach()


def simpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, n_c: torch.Tensor, n_r: torch.Tensor, beta: float,
               gamma: float) -> Rewards:
    """SimPO: length-normalised rewards with a target margin gamma, no reference."""
    chosen, rejected = beta * pi_c / n_c, beta * pi_r / n_r
    return -F.logsigmoid(chosen - rejected - gamma), chosen.detach(), rejected.detach()


PairLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Any], Rewards]


@dataclass
class PreferenceStep:
    """The loop's loss for a pair objective: `step(model, batch, path)` -> sum of pair losses.

    losses(pi_c, pi_r, n_c, n_r, ref) -> (per-pair losses, chosen rewards, rejected rewards): the objective's
    formula (its options bound in), `ref` the reference's (chosen, rejected) sums when `uses_reference`, else None.
    base: the unwrapped model (its adapters are switched off for the reference). Every call adds its pairs'
    statistics to running sums; `stats(accelerator)` returns their means over all processes and resets them.
    """

    losses: PairLoss
    base: nn.Module
    uses_reference: bool = False
    sums: dict[str, float] = field(default_factory=dict)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], path: str = "keep") -> torch.Tensor:
        logps, counts = sequence_logps(model, batch, path)
        pairs = logps.shape[0] // 2
        pi_c, pi_r, n_c, n_r = logps[:pairs], logps[pairs:], counts[:pairs], counts[pairs:]
        ref = self.reference(batch, path, model) if self.uses_reference else None
        losses, r_c, r_r = self.losses(pi_c, pi_r, n_c, n_r, ref)
        self._add(losses.detach(), r_c, r_r, (pi_c / n_c - pi_r / n_r).detach())
        return losses.sum()

    def fresh(self) -> PreferenceStep:
        """The same loss with empty running sums (the held-out score keeps its own)."""
        return PreferenceStep(self.losses, self.base, self.uses_reference)

    def reference(self, batch: dict[str, torch.Tensor], path: str,
                  model: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """DPO's reference log-prob sums (chosen, rejected): precomputed in the batch, or the model without its
        adapters, now, under no_grad. `model` is the (maybe DDP / FSDP-wrapped) model of the step: the adapters
        are switched off on `base`, whose modules the wrapper shares, and the forward goes through the wrapper
        (FSDP's sharded weights are only whole inside it)."""
        if "ref_chosen" in batch:
            return batch["ref_chosen"], batch["ref_rejected"]
        with torch.no_grad(), disable_adapters(self.base):
            logps, _ = sequence_logps(self.base if model is None else model, batch, path)
        pairs = logps.shape[0] // 2
        return logps[:pairs], logps[pairs:]

    def _add(self, losses: torch.Tensor, r_c: torch.Tensor, r_r: torch.Tensor, avg_gap: torch.Tensor) -> None:
        values = {"loss": losses, "rewards/chosen": r_c, "rewards/rejected": r_r, "rewards/margins": r_c - r_r,
                  "rewards/accuracies": (r_c > r_r).float(), "preference_accuracy": (avg_gap > 0).float(),
                  "pairs": torch.ones_like(losses)}
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value.double().sum())

    def stats(self, accelerator: Any = None) -> dict[str, float]:
        """Means of the statistics since the last call (over every process when given the accelerator)."""
        keys = [*STATS, "pairs"]
        totals = torch.tensor([self.sums.get(k, 0.0) for k in keys], dtype=torch.float64)
        if accelerator is not None and accelerator.num_processes > 1:
            totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum").cpu()
        self.sums = {}
        pairs = float(totals[-1])
        means = {k: float(v) / max(pairs, 1.0) for k, v in zip(STATS, totals[:-1].tolist(), strict=True)}
        return {**means, "pairs": int(pairs)}


def count_pairs(batch: dict[str, torch.Tensor]) -> int:
    """Pairs in a preference micro-batch (half its rows): what the loop normalises the summed loss by."""
    return batch["input_ids"].shape[0] // 2
