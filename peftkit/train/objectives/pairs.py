"""What dpo, orpo and simpo share: `{prompt, chosen, rejected}` rows (`data.preference.Pairs`, two model rows per
example), the bundled preference task, the refusals of SFT-only options, and a run (`pairs_run.PairRun`)
whose loss is `train/objectives/preference_loss.py`'s PreferenceStep. A pair objective only says its options and its formula
(`pair_loss`) and whether it needs a reference model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.errors import PeftkitError
from peftkit.train.objectives.base import Objective, ObjectiveRun

if TYPE_CHECKING:
    from peftkit.core.method import Method
    from peftkit.train.config import TrainConfig
    from peftkit.train.run import Session

# The bundled preference task with no --data: a step of 4 pairs is 8 rows (+ DPO's no_grad reference forward of
# them), about the cost of a bundled SFT step of 8 examples; 20 steps keep the zero-argument run to minutes.
BUNDLED_PAIR_DEFAULTS = {"max_steps": 20, "batch_size": 4}


class PairObjective(Objective):
    """A preference objective on chosen / rejected pairs (see the module docstring)."""

    rows_per_example = 2
    uses_reference = False        # DPO: the model before training scores each pair too
    row_shape = "preference rows (prompt, chosen, rejected)"
    bundled_defaults = BUNDLED_PAIR_DEFAULTS

    def pair_loss(self, options: dict[str, Any]) -> Any:
        """(pi_c, pi_r, n_c, n_r, ref) -> (per-pair losses, chosen rewards, rejected rewards), `options` bound in
        (train/objectives/preference_loss.py's formulas; ref: the reference's (chosen, rejected) sums or None)."""
        raise NotImplementedError

    def step(self, model: Any, options: dict[str, Any]) -> Any:
        """The loop's loss for this objective over `model` (the unwrapped model: its adapters give the reference)."""
        from peftkit.train.objectives.preference_loss import PreferenceStep

        return PreferenceStep(self.pair_loss(options), model, self.uses_reference)

    def bundled(self) -> tuple[str, str]:
        from peftkit import data

        return str(data.BUNDLED_PREFERENCE_TRAIN), str(data.BUNDLED_PREFERENCE_EVAL)

    def accepts(self, column_names: list[str]) -> bool:
        from peftkit.data.preference import is_preference

        return is_preference(column_names)

    def load_splits(self, rows: Any, eval_rows: Any, tokenizer: Any, cfg: TrainConfig, prompt_format: dict) -> tuple:
        from peftkit.data.preference import pair_kind

        train, held = self.tokenized_splits(
            rows, eval_rows, cfg.eval_examples, "preference rows", "{prompt, chosen, rejected}",
            lambda part, what: _pairs(part, tokenizer, cfg, prompt_format, what))
        return train, held, f"preference pairs, {pair_kind(rows[0])}"

    def check(self, cfg: TrainConfig, method: Method) -> None:
        refuse_sft_options(cfg, self.name, "{prompt, chosen, rejected} rows")

    def start(self, session: Session, loss_path: str) -> ObjectiveRun:
        from peftkit.train.objectives.pairs_run import setup

        options = session.cfg.objective_options
        return setup(session, loss_path, self.step(session.model, options), bool(options.get("precompute_ref")))


def refuse_sft_options(cfg: TrainConfig, name: str, rows: str) -> None:
    """--packing, --train-on-prompt and --format are SFT's; an objective scoring whole responses refuses them."""
    if cfg.packing:
        raise PeftkitError(f"--packing does not work with --objective {name}: its responses are scored as "
                           "separate padded rows; drop --packing")
    if cfg.train_on_prompt or cfg.format != "auto":
        raise PeftkitError(f"--train-on-prompt and --format are SFT options; --objective {name} scores only "
                           f"the responses of {rows}, whose shape is detected from the values")


def refuse_base_without_reference(cfg: TrainConfig, name: str, method: Method) -> None:
    """A reference is the adapter switched off; a method training the base itself needs it precomputed."""
    if method.trains_base and not cfg.objective_options.get("precompute_ref"):
        raise PeftkitError(f"{name.upper()} with --method {method.name} needs --precompute-ref: the reference is "
                           "the model before training, and without an adapter to switch off it can only be kept by "
                           "computing its log-probabilities once before the first step")


def _pairs(rows: Any, tokenizer: Any, cfg: TrainConfig, prompt_format: dict, what: str) -> Any:
    from peftkit.data.preference import tokenize_pairs

    assert cfg.max_length is not None, "a resolved config (resolve_defaults fills max_length)"
    pairs = tokenize_pairs(rows, tokenizer, max_length=cfg.max_length, prompt_format=prompt_format)
    if not len(pairs):
        raise PeftkitError(f"no {what} pair has response tokens left after truncation to --max-length "
                           f"{cfg.max_length}; raise --max-length")
    return pairs
