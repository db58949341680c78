"""The training objectives and their options: which exist, their defaults, and what each refuses (no torch here:
`TrainConfig` validates with it before anything loads).

- `sft`: next-token cross-entropy on the answers (loss.py).
- `dpo`, `orpo`, `simpo`: preference objectives on `{prompt, chosen, rejected}` rows (preference.py has the
  formulas). `beta` is DPO's and SimPO's temperature and ORPO's lambda (the weight of the odds-ratio term), as in
  TRL's `ORPOConfig.beta` and LLaMA-Factory's `pref_beta`; `simpo_gamma` is SimPO's target reward margin.
"""

from __future__ import annotations

from typing import Any

from peftkit.errors import PeftkitError

OBJECTIVES = ("sft", "dpo", "orpo", "simpo")
PREFERENCE = ("dpo", "orpo", "simpo")
# DPO: the paper's and TRL's 0.1. ORPO: TRL's default lambda 0.1. SimPO: the paper's beta 2.0, gamma 1.0 (gamma/beta
# 0.5, the ratio its ablations favour).
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0}
DEFAULT_SIMPO_GAMMA = 1.0
# The bundled preference task with no --data: a step of 4 pairs is 8 rows (+ DPO's no_grad reference forward of
# them), about the cost of a bundled SFT step of 8 examples; 20 steps keep the zero-argument run to minutes.
BUNDLED_PREFERENCE_DEFAULTS = {"max_steps": 20, "batch_size": 4}


def check_objective(cfg: Any, trains_base: bool) -> None:
    """Refuse option combinations that cannot work, with what to do instead (cfg: a TrainConfig)."""
    if cfg.objective not in OBJECTIVES:
        raise PeftkitError(f"objective must be one of {', '.join(OBJECTIVES)}; got {cfg.objective!r}")
    preference = cfg.objective in PREFERENCE
    if not preference and cfg.beta is not None:
        raise PeftkitError("--beta is a preference-objective option; add --objective dpo, orpo or simpo")
    if cfg.simpo_gamma is not None and cfg.objective != "simpo":
        raise PeftkitError(f"simpo_gamma is SimPO's margin; it does nothing with --objective {cfg.objective}")
    if cfg.precompute_ref and cfg.objective != "dpo":
        raise PeftkitError("--precompute-ref computes DPO's reference log-probabilities; only --objective dpo "
                           "uses a reference model")
    if preference and cfg.packing:
        raise PeftkitError(f"--packing does not work with --objective {cfg.objective}: chosen and rejected "
                           "responses are scored as separate padded rows; drop --packing")
    if preference and (cfg.train_on_prompt or cfg.format != "auto"):
        raise PeftkitError(f"--train-on-prompt and --format are SFT options; --objective {cfg.objective} scores only "
                           "the responses of {prompt, chosen, rejected} rows, whose shape is detected from the values")
    if cfg.objective == "dpo" and trains_base and not cfg.precompute_ref:
        raise PeftkitError(f"DPO with --method {cfg.method} needs --precompute-ref: the reference is the model "
                           "before training, and without an adapter to switch off it can only be kept by "
                           "computing its log-probabilities once before the first step")


def objective_defaults(cfg: Any) -> dict[str, Any]:
    """The options left unset that depend on cfg.objective: beta / simpo_gamma, and the bundled preference task's
    step count and batch size when there is no --data (an empty dict for sft; applied after config's defaults)."""
    fill: dict[str, Any] = {}
    if cfg.objective in PREFERENCE and cfg.data is None:
        fill.update({k: v for k, v in BUNDLED_PREFERENCE_DEFAULTS.items() if getattr(cfg, k) is None})
        if cfg.epochs != 1.0:
            fill.pop("max_steps", None)  # an explicit --epochs wins over the bundled step count
    if cfg.objective in PREFERENCE and cfg.beta is None:
        fill["beta"] = DEFAULT_BETA[cfg.objective]
    if cfg.objective == "simpo" and cfg.simpo_gamma is None:
        fill["simpo_gamma"] = DEFAULT_SIMPO_GAMMA
    return fill
