"""A preference objective inside a training run: DPO's precomputed reference, the loop's collate, loss and count,
and the held-out score (the pairs come from `splits.load_splits`). run.py calls `setup(session, loss_path)` once,
then uses what it returns:

    pref.adapt(loop)                    # the loop's collate / loss / count become the pairs'
    pref.step.stats(accelerator)        # per optimizer step: rewards, margins, accuracies (all processes)
    pref.score(model, collate, plan)    # held-out: loss, rewards, reward accuracy, preference accuracy

"preference_accuracy" is the share of held-out pairs whose chosen response has the higher mean token log-prob
under the model: defined for every objective and for the untrained model, so "before" and "after" compare.
"rewards/accuracies" is TRL's: the share whose objective reward is higher (0 before DPO training, where both
rewards are 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from peftkit.core.ops import disable_adapters
from peftkit.data.preference import Pairs, collate_pairs
from peftkit.train import splits
from peftkit.train.preference import PreferenceStep, count_pairs, sequence_logps


def collate_fn(pairs: Pairs, pad_token_id: int, device: Any) -> Callable[[list[int]], dict[str, torch.Tensor]]:
    """indices -> a [2B, T] chosen + rejected batch on `device`."""
    def collate(indices: list[int]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in collate_pairs(pairs, indices, pad_token_id).items()}

    return collate


@dataclass
class Preference:
    """What a run with a preference objective swaps in (see the module docstring)."""

    step: PreferenceStep
    collate: Callable[[list[int]], dict[str, torch.Tensor]]
    eval_collate: Callable[[list[int]], dict[str, torch.Tensor]] | None

    def adapt(self, loop: Any) -> None:
        """Swap the loop's batches, loss and normaliser for the pairs' (the step takes the loop's loss path)."""
        loop.collate, loop.loss_fn, loop.count_fn = self.collate, self.step, count_pairs

    @torch.no_grad()
    def score(self, model: Any, collate: Callable, plan: list[list[int]], path: str = "keep") -> dict:
        """Held-out loss and statistics, averaged over pairs (the eval keeps its own running sums)."""
        was_training = model.training
        model.eval()
        scorer = PreferenceStep(self.step.objective, self.step.beta, self.step.base, self.step.gamma)
        try:
            for indices in plan:
                scorer(model, collate(indices), path)
        finally:
            model.train(was_training)
        return scorer.stats()


def setup(s: Any, path: str) -> Preference:
    """The run's Preference (s: the run's Session, model on its device); precomputes DPO's reference first when
    --precompute-ref asks (before a resumed checkpoint is loaded: the reference is the model before training)."""
    cfg, device, pad = s.cfg, s.accelerator.device, s.tokenizer.pad_token_id
    step = PreferenceStep(cfg.objective, cfg.beta, s.model, cfg.simpo_gamma or 0.0)
    held = s.eval_split
    if cfg.precompute_ref:
        for pairs in (s.train_split, held):
            if pairs is not None:
                plan = splits.plan_fn(pairs, cfg, shuffle=False)(0)
                with s.accelerator.autocast():
                    precompute_reference(s.model, pairs, plan, collate_fn(pairs, pad, device), path)
    return Preference(step, collate_fn(s.train_split, pad, device),
                      collate_fn(held, pad, device) if held is not None else None)


@torch.no_grad()
def precompute_reference(model: Any, pairs: Pairs, plan: list[list[int]], collate: Callable,
                         path: str = "keep") -> None:
    """Fill pairs.ref_chosen / ref_rejected with the model's log-prob sums, adapters off, in eval mode."""
    chosen, rejected = [0.0] * len(pairs), [0.0] * len(pairs)
    was_training = model.training
    model.eval()
    try:
        with disable_adapters(model):
            for indices in plan:
                logps, _ = sequence_logps(model, collate(indices), path)
                for row, index in enumerate(indices):
                    chosen[index], rejected[index] = float(logps[row]), float(logps[len(indices) + row])
    finally:
        model.train(was_training)
    pairs.ref_chosen, pairs.ref_rejected = chosen, rejected


def describe(result: dict) -> str:
    """One line for the eval before / after training."""
    em = result.get("exact_match")
    em_text = f", exact match {em:.0%} of {result['n']}" if em is not None else ""
    return (f"loss {result['loss']:.4f}, preference accuracy {result['preference_accuracy']:.0%} of "
            f"{result['pairs']} pairs, reward accuracy {result['rewards/accuracies']:.0%}, reward margin "
            f"{result['rewards/margins']:.3f}{em_text}")
