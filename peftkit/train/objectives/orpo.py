"""`orpo` (Hong et al. 2024): the chosen response's mean token NLL plus lambda times -log sigmoid of the log
odds ratio (train/objectives/preference_loss.py). No reference model. `beta` is lambda, as TRL's `ORPOConfig.beta` and
LLaMA-Factory's `pref_beta`."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from peftkit.train.objectives.base import register_objective
from peftkit.train.objectives.dpo import BETA
from peftkit.train.objectives.pairs import PairObjective


class Orpo(PairObjective):
    """Odds-ratio preference optimisation (see the module docstring)."""

    name = "orpo"
    options = (replace(BETA, help="ORPO's lambda: the weight of the odds-ratio term (TRL's default 0.1)."),)

    def pair_loss(self, options: dict[str, Any]) -> Any:
        from peftkit.train.objectives.preference_loss import orpo_loss

        lam = options["beta"]
        return lambda pi_c, pi_r, n_c, n_r, ref: orpo_loss(pi_c, pi_r, n_c, n_r, lam)


register_objective(Orpo())
