"""`sft`: next-token cross-entropy on the answers (train/loop/loss.py), the default objective.

A micro-batch's loss is the sum of its target tokens' losses; the loop divides by the target tokens of the whole
step. Rows are any SFT format (alpaca, messages, text, prompt_completion: peftkit.data); batches may share a
prompt prefix computed once (train/loop/shared_prefix.py). The held-out score is the eval loss and perplexity (exact
match is added by run.py for every objective whose split has references).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.train.objectives.base import CollatedRun, Objective, exact_match_text, register_objective

if TYPE_CHECKING:
    from peftkit.train.config import TrainConfig
# `session` (a run.Session) stays Any: run.py imports loop/fit.py, which imports SftRun from here (its default
# objective), so importing run.py here, even for type checking only, would be an import cycle.


class SftRun(CollatedRun):
    """SFT inside a run: the step's collated micro-batches, micro_loss, count_targets, eval loss."""

    def loss(self, model: Any, batch: dict[str, Any], loss_path: str) -> Any:
        from peftkit.train.loop.loss import micro_loss

        return micro_loss(model, batch, loss_path)

    def count(self, batch: dict[str, Any]) -> int:
        from peftkit.train.loop.loss import count_targets

        return count_targets(batch)

    def evaluate(self, model: Any, loss_path: str) -> dict[str, Any]:
        from peftkit.train.evaluation.heldout import eval_loss

        assert self.eval_collate is not None  # run.py evaluates only a run with an eval split
        return eval_loss(model, self.eval_collate, self.eval_plan, loss_path)

    def describe(self, result: dict[str, Any]) -> str:
        return f"loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}{exact_match_text(result)}"


class Sft(Objective):
    """Supervised fine-tuning (see the module docstring)."""

    name = "sft"
    shares_prefix = True
    row_shape = "SFT rows"

    def bundled(self) -> tuple[str, str]:
        from peftkit import data

        return str(data.BUNDLED_TRAIN), str(data.BUNDLED_EVAL)

    def defaults(self, cfg: TrainConfig) -> dict[str, Any]:
        return {}  # config.BUNDLED_DEFAULTS are SFT's bundled-task figures

    def load_splits(self, rows: Any, eval_rows: Any, tokenizer: Any, cfg: TrainConfig, prompt_format: dict) -> tuple:
        from peftkit import data
        from peftkit.train.splits import tokenized

        fmt = data.detect_format(rows.column_names) if cfg.format == "auto" else cfg.format
        train = tokenized(rows, tokenizer, cfg, prompt_format, fmt, "training")
        held = None
        if eval_rows is not None and len(eval_rows):
            eval_rows = eval_rows.select(range(min(len(eval_rows), cfg.eval_examples)))
            held = tokenized(eval_rows, tokenizer, cfg, prompt_format, fmt, "eval")
        return train, held, fmt

    def start(self, session: Any, loss_path: str) -> SftRun:
        from peftkit.train import splits

        s = session
        pad, device = s.tokenizer.pad_token_id, s.accelerator.device
        collate = splits.collate_fn(s.train_split, pad, s.cfg.packing, device, s.share_prefix)
        if s.eval_split is None:
            return SftRun(collate)
        eval_collate = splits.collate_fn(s.eval_split, pad, s.cfg.packing, device, s.share_prefix)
        return SftRun(collate, eval_collate, splits.plan_fn(s.eval_split, s.cfg, shuffle=False)(0))


register_objective(Sft())
