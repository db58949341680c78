"""`simpo` (Meng et al. 2024): -log sigmoid(beta * pi_c / |y_c| - beta * pi_r / |y_r| - gamma): length-normalised
rewards with a target margin, no reference (train/objectives/preference_loss.py). Defaults: the paper's beta 2.0 and gamma 1.0
(gamma / beta 0.5, the ratio its ablations favour)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from peftkit.core.options import Option
from peftkit.train.objectives.base import register_objective
from peftkit.train.objectives.dpo import BETA
from peftkit.train.objectives.pairs import PairObjective

GAMMA = Option("simpo_gamma", float, 1.0, "SimPO's target reward margin.", low=0, high=1e3)


class Simpo(PairObjective):
    """Simple preference optimisation (see the module docstring)."""

    name = "simpo"
    options = (replace(BETA, default=2.0, help="SimPO's reward scale (default 2.0)."), GAMMA)

    def pair_loss(self, options: dict[str, Any]) -> Any:
        from peftkit.train.objectives.preference_loss import simpo_loss

        beta, gamma = options["beta"], options["simpo_gamma"]
        return lambda pi_c, pi_r, n_c, n_r, ref: simpo_loss(pi_c, pi_r, n_c, n_r, beta, gamma)


register_objective(Simpo())
