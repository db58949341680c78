"""A pair objective (dpo, orpo, simpo) inside a training run: the step's chosen + rejected batches, the loss and
its normaliser, the per-step statistics, the precomputed reference and the held-out score (the pairs come from
`splits.load_splits`, through the objective's `load_splits`). `objectives/pairs.py` builds it with `setup`.

"preference_accuracy" is the share of held-out pairs whose chosen response has the higher mean token log-prob
under the model: defined for every objective and for the untrained model, so "before" and "after" compare.
"rewards/accuracies" is TRL's: the share whose objective reward is higher (0 before DPO training, where both
rewards are 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from peftkit.core.ops import disable_adapters
from peftkit.data.preference import Pairs, collate_pairs
from peftkit.train import splits
from peftkit.train.objectives.base import CollatedRun, exact_match_text
from peftkit.train.objectives.preference_loss import PreferenceStep, count_pairs, sequence_logps

if TYPE_CHECKING:
    from peftkit.train.run import Session


def collate_fn(pairs: Pairs, pad_token_id: int, device: Any) -> Callable[[list[int]], dict[str, torch.Tensor]]:
    """indices -> a [2B, T] chosen + rejected batch on `device`."""
    def collate(indices: list[int]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in collate_pairs(pairs, indices, pad_token_id).items()}

    return collate


class PairRun(CollatedRun):
    """What the loop and the evaluation ask of a pair objective (see `ObjectiveRun`)."""

    def __init__(self, step: PreferenceStep, collate: Callable, eval_collate: Callable | None,
                 eval_plan: list[list[int]] | None) -> None:
        super().__init__(collate, eval_collate, eval_plan)
        self.step = step

    def loss(self, model: Any, batch: dict[str, Any], loss_path: str) -> torch.Tensor:
        return self.step(model, batch, loss_path)

    def count(self, batch: dict[str, Any]) -> int:
        return count_pairs(batch)

    def stats(self, accelerator: Any = None) -> dict[str, float]:
        return self.step.stats(accelerator)

    def evaluate(self, model: Any, loss_path: str) -> dict[str, Any]:
        """Held-out loss and statistics, averaged over pairs (the eval keeps its own running sums)."""
        scorer = self.step.fresh()
        self.score_held_out(model, scorer, loss_path)
        return scorer.stats()

    def describe(self, result: dict[str, Any]) -> str:
        return describe(result)


def setup(s: Session, path: str, step: PreferenceStep, precompute: bool) -> PairRun:
    """The run's PairRun (s: the run's Session, model on its device); precomputes the reference first when asked
    (before a resumed checkpoint is loaded: the reference is the model before training)."""
    cfg, device, pad = s.cfg, s.accelerator.device, s.tokenizer.pad_token_id
    train, held = s.train_split, s.eval_split  # what PairObjective.load_splits made
    assert isinstance(train, Pairs) and (held is None or isinstance(held, Pairs))
    if precompute:
        for pairs in (train, held):
            if pairs is not None:
                plan = splits.plan_fn(pairs, cfg, shuffle=False)(0)
                with s.accelerator.autocast():
                    precompute_reference(s.model, pairs, plan, collate_fn(pairs, pad, device), path)
    eval_plan = splits.plan_fn(held, cfg, shuffle=False)(0) if held is not None else None
    return PairRun(step, collate_fn(train, pad, device),
                   collate_fn(held, pad, device) if held is not None else None, eval_plan)


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
    return (f"loss {result['loss']:.4f}, preference accuracy {result['preference_accuracy']:.0%} of "
            f"{result['pairs']} pairs, reward accuracy {result['rewards/accuracies']:.0%}, reward margin "
            f"{result['rewards/margins']:.3f}{exact_match_text(result)}")
