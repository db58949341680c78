"""`kto` (Ethayarajh et al. 2024): Kahneman-Tversky optimisation on unpaired rows `{prompt, completion, label}`
(label true: a desirable completion, false: an undesirable one), TRL's unpaired preference format, text or
conversational (data/unpaired.py). The loss and its statistics are train/objectives/kto_loss.py's; the options are TRL's KTOConfig's
(`beta` 0.1, `desirable_weight` / `undesirable_weight` 1.0). Like DPO it needs a reference: the adapter switched
off, or precomputed (`--precompute-ref`, required by methods that train the base).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from peftkit.core.options import Option
from peftkit.errors import PeftkitError
from peftkit.train.objectives.base import Objective, ObjectiveRun, register_objective
from peftkit.train.objectives.dpo import BETA, PRECOMPUTE_REF
from peftkit.train.objectives.pairs import refuse_base_without_reference, refuse_sft_options

if TYPE_CHECKING:
    from peftkit.core.method import Method
    from peftkit.train.config import TrainConfig
    from peftkit.train.run import Session

OPTIONS = (
    replace(BETA, help="KTO's temperature (as in TRL's KTOConfig)."),
    Option("desirable_weight", float, 1.0, "KTO: the weight of desirable examples' losses.", low=0, high=1e3,
           low_open=True),
    Option("undesirable_weight", float, 1.0, "KTO: the weight of undesirable examples' losses.", low=0, high=1e3,
           low_open=True),
    PRECOMPUTE_REF,
)


class Kto(Objective):
    """Kahneman-Tversky optimisation (see the module docstring)."""

    name = "kto"
    options = OPTIONS
    rows_per_example = 2          # each example's row and its mismatched KL row
    row_shape = "unpaired preference rows (prompt, completion, label)"
    # A step of 8 examples: 8 rows with gradients + 24 without (KL rows, reference of both), about a bundled
    # DPO step's cost; 30 steps see 240 of the 500 bundled examples.
    bundled_defaults = {"max_steps": 30, "batch_size": 8}

    def bundled(self) -> tuple[str, str]:
        from peftkit import data

        return str(data.BUNDLED_KTO_TRAIN), str(data.BUNDLED_KTO_EVAL)

    def accepts(self, column_names: list[str]) -> bool:
        from peftkit.data.unpaired import is_unpaired

        return is_unpaired(column_names)

    def load_splits(self, rows: Any, eval_rows: Any, tokenizer: Any, cfg: TrainConfig, prompt_format: dict) -> tuple:
        train, held = self.tokenized_splits(
            rows, eval_rows, cfg.eval_examples, "unpaired rows", "{prompt, completion, label}",
            lambda part, what: _tokenized(part, tokenizer, cfg, prompt_format, what))
        good = sum(train.desirable)
        return train, held, f"unpaired rows, {good} desirable and {len(train) - good} undesirable"

    def check(self, cfg: TrainConfig, method: Method) -> None:
        refuse_sft_options(cfg, self.name, "{prompt, completion, label} rows")
        if cfg.batch_size == 1:
            raise PeftkitError("--objective kto needs --batch-size >= 2: the KL term is estimated from the other "
                               "examples of the micro-batch (with one, it equals the example's own reward)")
        refuse_base_without_reference(cfg, self.name, method)

    def start(self, session: Session, loss_path: str) -> ObjectiveRun:
        from peftkit.data.unpaired import Unpaired
        from peftkit.train import splits
        from peftkit.train.objectives import kto_loss as kto

        s, options = session, session.cfg.objective_options
        train, held = s.train_split, s.eval_split  # what load_splits above made
        assert isinstance(train, Unpaired) and (held is None or isinstance(held, Unpaired))
        device, pad = s.accelerator.device, s.tokenizer.pad_token_id
        step = kto.KtoStep(options["beta"], s.model, options["desirable_weight"], options["undesirable_weight"])
        if options["precompute_ref"]:
            for data in (train, held):
                if data is not None:
                    with s.accelerator.autocast():
                        kto.precompute_reference(s.model, data, splits.plan_fn(data, s.cfg, shuffle=False)(0),
                                                 kto.collate_fn(data, pad, device), loss_path)
        return kto.KtoRun(step, kto.collate_fn(train, pad, device),
                          kto.collate_fn(held, pad, device) if held is not None else None,
                          splits.plan_fn(held, s.cfg, shuffle=False)(0) if held is not None else None)


def _tokenized(rows: Any, tokenizer: Any, cfg: TrainConfig, prompt_format: dict, what: str) -> Any:
    from peftkit.data.unpaired import tokenize_unpaired

    assert cfg.max_length is not None, "a resolved config (resolve_defaults fills max_length)"
    data = tokenize_unpaired(rows, tokenizer, max_length=cfg.max_length, prompt_format=prompt_format)
    if len(data) < 2:
        raise PeftkitError(f"the {what} data needs at least 2 unpaired rows with completion tokens left after "
                           f"truncation to --max-length {cfg.max_length} (KTO's KL term pairs each prompt with "
                           f"another row's completion); it has {len(data)}")
    return data


register_objective(Kto())
