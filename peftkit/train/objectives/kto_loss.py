"""KTO (Ethayarajh et al. 2024) on unpaired rows: the loss, the training step, and the run the objective builds.

For each example, pi and ref are the policy's and the reference's log-prob sums of its completion; the KL term is
estimated from the micro-batch's mismatched rows (data/unpaired.py: each prompt with another example's completion):

    z0 = max(0, mean(pi_KL - ref_KL))            (no gradient: computed under no_grad)
    desirable:   w_d * (1 - sigmoid(beta * (pi - ref - z0)))
    undesirable: w_u * (1 - sigmoid(beta * (z0 - (pi - ref))))
    rewards      beta * (pi - ref)

as TRL's KTOTrainer (loss_type "kto"; TRL estimates z0 per batch over all processes, peftkit per micro-batch).
The reference is the model with its adapters switched off (`core.ops.disable_adapters`, no second copy), or read
from the batch when precomputed. A micro-batch's loss is the SUM over its examples; the loop divides by the
examples of the whole step (`count_rows`), so TRL's per-batch mean is what one micro-batch per step gives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftkit.core.ops import disable_adapters
from peftkit.data.unpaired import Unpaired, collate_unpaired
from peftkit.train.objectives.base import CollatedRun, exact_match_text
from peftkit.train.objectives.preference_loss import sequence_logps

SUMS = ("loss", "kl", "rewards/chosen", "logps/chosen", "rewards/rejected", "logps/rejected", "correct", "rows",
        "chosen", "rejected", "batches")


def kto_loss(pi: torch.Tensor, ref: torch.Tensor, pi_kl: torch.Tensor, ref_kl: torch.Tensor,
             desirable: torch.Tensor, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-example losses [B], rewards [B], the KL estimate z0 []) from log-prob sums [B] and labels [B] (bool)."""
    z0 = (pi_kl - ref_kl).mean().detach().clamp(min=0)
    logratio = pi - ref
    good = desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio)))
    return torch.where(desirable, good, bad), beta * logratio.detach(), z0


def _part(batch: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The model rows of a KTO batch: the examples' (prefix "") or their KL rows (prefix "kl_")."""
    return {k: batch[prefix + k] for k in ("input_ids", "labels", "attention_mask") if prefix + k in batch}


@dataclass
class KtoStep:
    """The loop's loss for KTO: `step(model, batch, path)` -> sum of the examples' losses; running statistics,
    `stats(accelerator)` their means over all processes. base: the unwrapped model (adapters off: reference)."""

    beta: float
    base: nn.Module
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    sums: dict[str, float] = field(default_factory=dict)
    groups: list[tuple[int, bool, float]] = field(default_factory=list)  # (prompt id, desirable, mean logp)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], path: str = "keep") -> torch.Tensor:
        own, kl = _part(batch, ""), _part(batch, "kl_")
        pi, n = sequence_logps(model, own, path)
        with torch.no_grad():
            pi_kl, _ = sequence_logps(model, kl, path)
            ref, ref_kl = self.reference(model, batch, path)
        desirable = batch["desirable"]
        losses, rewards, z0 = kto_loss(pi, ref, pi_kl, ref_kl, desirable, self.beta, self.desirable_weight,
                                       self.undesirable_weight)
        self._add(losses.detach(), rewards, pi.detach(), desirable, z0)
        self.groups += zip(batch["prompt_ids"].tolist(), desirable.tolist(), (pi.detach() / n).tolist(), strict=True)
        return losses.sum()

    def reference(self, model: nn.Module, batch: dict[str, torch.Tensor],
                  path: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's log-prob sums of the examples and of their KL rows: precomputed, or the step's model
        (maybe wrapped) with the adapters of `base` switched off, under no_grad."""
        if "ref_logps" in batch:
            return batch["ref_logps"], batch["ref_kl_logps"]
        with torch.no_grad(), disable_adapters(self.base):
            return sequence_logps(model, _part(batch, ""), path)[0], sequence_logps(model, _part(batch, "kl_"), path)[0]

    def _add(self, losses: torch.Tensor, rewards: torch.Tensor, pi: torch.Tensor, desirable: torch.Tensor,
             z0: torch.Tensor) -> None:
        good = desirable.to(rewards.dtype)
        values: dict[str, torch.Tensor | int] = {
            "loss": losses.sum(), "kl": z0, "rewards/chosen": (rewards * good).sum(),
            "logps/chosen": (pi * good).sum(), "rewards/rejected": (rewards * (1 - good)).sum(),
            "logps/rejected": (pi * (1 - good)).sum(),
            "correct": ((rewards > 0) == desirable).logical_and(rewards != 0).sum(),
            "rows": len(losses), "chosen": good.sum(), "rejected": (1 - good).sum(), "batches": 1}
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def stats(self, accelerator: Any = None) -> dict[str, float]:
        """Means since the last call (over every process when given the accelerator), as TRL logs them: rewards
        and log-probs per desirable / undesirable example, margins, the KL estimate, and the share of examples
        whose reward has the sign of their label (`rewards/accuracies`)."""
        totals = torch.tensor([self.sums.get(k, 0.0) for k in SUMS], dtype=torch.float64)
        if accelerator is not None and accelerator.num_processes > 1:
            totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum").cpu()
        self.sums = {}
        t = dict(zip(SUMS, totals.tolist(), strict=True))
        chosen, rejected = max(t["chosen"], 1.0), max(t["rejected"], 1.0)
        out = {"loss": t["loss"] / max(t["rows"], 1.0), "kl": t["kl"] / max(t["batches"], 1.0),
               "rewards/chosen": t["rewards/chosen"] / chosen, "rewards/rejected": t["rewards/rejected"] / rejected,
               "logps/chosen": t["logps/chosen"] / chosen, "logps/rejected": t["logps/rejected"] / rejected,
               "rewards/accuracies": t["correct"] / max(t["rows"], 1.0), "examples": int(t["rows"])}
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out

    def preference_accuracy(self) -> tuple[float | None, int]:
        """(share of (desirable, undesirable) completions of the same prompt where the desirable one has the
        higher mean token log-prob, how many such comparisons), over the examples seen; resets them."""
        by_prompt: dict[int, tuple[list[float], list[float]]] = {}
        for prompt, good, mean in self.groups:
            by_prompt.setdefault(prompt, ([], []))[0 if good else 1].append(mean)
        self.groups = []
        wins = [a > b for good, bad in by_prompt.values() for a in good for b in bad]
        return (sum(wins) / len(wins) if wins else None), len(wins)


class KtoRun(CollatedRun):
    """KTO inside a run (see `ObjectiveRun`)."""

    def __init__(self, step: KtoStep, collate: Callable, eval_collate: Callable | None,
                 eval_plan: list[list[int]] | None) -> None:
        super().__init__(collate, eval_collate, eval_plan)
        self.step = step

    def loss(self, model: Any, batch: dict[str, Any], loss_path: str) -> torch.Tensor:
        self.step.groups = []  # only the held-out score compares completions of a prompt
        return self.step(model, batch, loss_path)

    def count(self, batch: dict[str, Any]) -> int:
        return int(batch["desirable"].shape[0])

    def stats(self, accelerator: Any = None) -> dict[str, float]:
        return self.step.stats(accelerator)

    def evaluate(self, model: Any, loss_path: str) -> dict[str, Any]:
        """Held-out loss, rewards, reward accuracy and preference accuracy (see KtoStep.preference_accuracy)."""
        scorer = KtoStep(self.step.beta, self.step.base, self.step.desirable_weight, self.step.undesirable_weight)
        self.score_held_out(model, scorer, loss_path)
        accuracy, compared = scorer.preference_accuracy()
        return {**scorer.stats(), "preference_accuracy": accuracy, "compared": compared}

    def describe(self, result: dict[str, Any]) -> str:
        acc = result.get("preference_accuracy")
        acc_text = f"preference accuracy {acc:.0%} of {result['compared']} comparisons, " if acc is not None else ""
        return (f"loss {result['loss']:.4f}, {acc_text}reward accuracy {result['rewards/accuracies']:.0%} of "
                f"{result['examples']} examples, reward margin {result['rewards/margins']:.3f}, kl "
                f"{result['kl']:.3f}{exact_match_text(result)}")


def collate_fn(data: Unpaired, pad_token_id: int, device: Any) -> Callable[[list[int]], dict[str, torch.Tensor]]:
    """indices -> a KTO micro-batch on `device`."""
    def collate(indices: list[int]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in collate_unpaired(data, indices, pad_token_id).items()}

    return collate


@torch.no_grad()
def precompute_reference(model: Any, data: Unpaired, plan: list[list[int]], collate: Callable,
                         path: str = "keep") -> None:
    """Fill data.ref_logps / ref_kl_logps with the model's log-prob sums, adapters off, in eval mode."""
    own, kl = [0.0] * len(data), [0.0] * len(data)
    was_training = model.training
    model.eval()
    try:
        with disable_adapters(model):
            for indices in plan:
                batch = collate(indices)
                a, b = sequence_logps(model, _part(batch, ""), path)[0], sequence_logps(model, _part(batch, "kl_"), path)[0]
                for row, index in enumerate(indices):
                    own[index], kl[index] = float(a[row]), float(b[row])
    finally:
        model.train(was_training)
    data.ref_logps, data.ref_kl_logps = own, kl
