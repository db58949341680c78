"""`dpo` (Rafailov et al. 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) on sequence log-prob
sums (train/objectives/preference_loss.py). The reference is the adapter switched off (`core.ops.disable_adapters`, no second
copy), or precomputed once before training (`--precompute-ref`, required by methods that train the base)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.core.options import Option
from peftkit.train.objectives.base import register_objective
from peftkit.train.objectives.pairs import PairObjective, refuse_base_without_reference

if TYPE_CHECKING:
    from peftkit.core.method import Method
    from peftkit.train.config import TrainConfig

# The paper's and TRL's beta. Shared by name with kto / orpo / simpo (each declares its own default).
BETA = Option("beta", float, 0.1, "DPO's temperature: how far the policy may move from the reference.", low=0,
              high=1e3, low_open=True, aliases=("pref_beta",))
PRECOMPUTE_REF = Option("precompute_ref", bool, False, "Compute the reference log-probs once before training "
                        "(needed by --method full / freeze).", aliases=("precompute_ref_log_probs",))


class Dpo(PairObjective):
    """Direct preference optimisation (see the module docstring)."""

    name = "dpo"
    options = (BETA, PRECOMPUTE_REF)
    uses_reference = True

    def pair_loss(self, options: dict[str, Any]) -> Any:
        from peftkit.train.objectives.preference_loss import dpo_loss

        beta = options["beta"]
        return lambda pi_c, pi_r, n_c, n_r, ref: dpo_loss(pi_c, pi_r, ref[0], ref[1], beta)

    def check(self, cfg: TrainConfig, method: Method) -> None:
        super().check(cfg, method)
        refuse_base_without_reference(cfg, self.name, method)


register_objective(Dpo())
