"""`smoothed_sft`: supervised fine-tuning with label smoothing, as a peftkit objective plugin.

Each target token's loss is torch's label-smoothed cross-entropy (Szegedy et al. 2016):

    loss_t = (1 - e) * -log p(y_t) + e * mean over the vocabulary of -log p(v)        e = --label-smoothing

so a fraction `e` of the target mass is spread uniformly over the vocabulary. Everything but the loss is the
built-in `sft` objective's: its rows (alpaca, messages, text, prompt_completion), data loading, batching, bundled
task and held-out score (the eval loss and perplexity stay plain, unsmoothed cross-entropy, comparable with `sft`).
With `--label-smoothing 0` it trains exactly as `--objective sft`.

The loss is a SUM over the micro-batch's target tokens, as every objective's: the loop divides by the step's
target count, so a step's loss is the mean per target token however the tokens fall into micro-batches.

This module imports no torch at module level: `peftkit train --help` builds its flags (here `--label-smoothing`)
from the objectives' declared options without loading torch. The registry finds the objective through the entry
point in pyproject.toml (or `peftkit.register_objective(SmoothedSft)`), so nothing in peftkit names it.
"""

from __future__ import annotations

from typing import Any

from peftkit.core.options import Option
from peftkit.train.objectives.sft import Sft, SftRun

LABEL_SMOOTHING = Option("label_smoothing", float, 0.1, "The share of each target's probability mass spread "
                         "uniformly over the vocabulary (torch's cross_entropy label_smoothing).", low=0, high=1,
                         high_open=True, aliases=("label_smoothing_factor",))


class SmoothedSftRun(SftRun):
    """SFT's run (collation, target counts, evaluation) with the training loss replaced by a smoothed one."""

    def __init__(self, label_smoothing: float, collate: Any, eval_collate: Any = None,
                 eval_plan: list[list[int]] | None = None) -> None:
        super().__init__(collate, eval_collate, eval_plan)
        self.label_smoothing = label_smoothing

    def loss(self, model: Any, batch: dict[str, Any], loss_path: str) -> Any:
        """The sum over the batch's target tokens of the label-smoothed cross-entropy (fp32), from the full logits
        (`loss_path` is not used: this loss needs every vocabulary logit of each target position)."""
        import torch.nn.functional as F

        from peftkit.core.labels import IGNORE_INDEX
        from peftkit.train.loop.loss import MODEL_INPUTS

        labels = batch["labels"]                                  # [B, T], -100: no loss
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        # The logits at positions 0..T-2 predict tokens 1..T-1 (counted from the end: a method may prepend tokens).
        logits = model(**inputs, use_cache=False).logits[:, -labels.shape[1]:-1]  # [B, T-1, V]
        return F.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum", label_smoothing=self.label_smoothing)


class SmoothedSft(Sft):
    """SFT with label smoothing (see the module docstring): `Sft` with one option and its own run."""

    name = "smoothed_sft"
    options = (LABEL_SMOOTHING,)
    shares_prefix = False  # the loss runs one plain forward per micro-batch, so batches mark no shared prefix

    def start(self, session: Any, loss_path: str) -> SmoothedSftRun:
        """SFT's run, carrying this run's `label_smoothing` (resolved: given or the declared default)."""
        sft = super().start(session, loss_path)
        smoothing = session.cfg.objective_options["label_smoothing"]
        return SmoothedSftRun(smoothing, sft.collate, sft.eval_collate, sft.eval_plan)
