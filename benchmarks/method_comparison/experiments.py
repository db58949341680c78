"""The experiments of the method comparison: which methods and settings, at which learning rates.

An experiment is a name (PEFT's method_comparison style: method-targets-rank), a family (whose learning-rate grid
it is swept over) and the `TrainConfig` fields that differ from the zero-argument run (`peftkit train --method lora
--rank 8`: 30 steps of 8 rows, max_length 128, cosine schedule, 10% warmup).

Learning rates, per family: the family's lead experiment (LEADS) is trained at every lr of the family's grid with
the first seed, and the lr with the lowest validation loss becomes the family's lr. In the full comparison every
other experiment is swept over the same grid too (each compared at its own best lr); in QUICK they are trained at
the family's lr, which is also how the rsLoRA paper compares ranks (one lr for every rank).

QUICK fits in about 15 minutes on a 2-core CPU: it holds what the four findings of the report need (attention-only
vs all-linear at equal parameters, LoRA's lr against full fine-tuning's, LoRA vs rsLoRA across ranks, forgetting of
LoRA vs full fine-tuning). FULL adds every other method and variant peftkit has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Learning-rate grids per family (about 4x apart, centred on what each family is known to want).
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "lora": (5e-4, 2e-3, 8e-3),
    "full": (2e-5, 1e-4, 5e-4),
    "scale": (3e-3, 1e-2, 4e-2),       # IA3 and VeRA: vectors that scale activations want larger steps
    "virtual": (3e-3, 1e-2, 3e-2),     # prefix and prompt tuning
    "bottleneck": (5e-4, 2e-3, 8e-3),
    "rotation": (5e-4, 2e-3, 8e-3),    # OFT, LoKr, LoHa
}
# Each family's lead: swept over the grid; in QUICK the family's other experiments take its best lr.
LEADS = {"lora": "lora-all-r8", "full": "full-finetuning", "scale": "ia3-default", "virtual": "prefix-20",
         "bottleneck": "adapter-houlsby", "rotation": "oft-all"}

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class Experiment:
    """One setting to compare: `options` are TrainConfig fields (method options as the CLI takes them)."""

    name: str
    family: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def lead(self) -> bool:
        return LEADS[self.family] == self.name

    def swept(self, quick: bool) -> bool:
        """Whether this experiment gets its own lr sweep (else it takes its family lead's lr)."""
        return self.lead or not quick

    @property
    def grid(self) -> tuple[float, ...]:
        return LR_GRIDS[self.family]


def lora(name: str, rank: int, targets: str | None = None, alpha: float | None = None, **extra: Any) -> Experiment:
    options: dict[str, Any] = {"method": "lora", "rank": rank}
    if targets:
        options["target_modules"] = targets
    if alpha is not None:
        options["alpha"] = alpha
    if extra:
        options["set"] = extra
    return Experiment(name, "lora", options)


# The findings' experiments (also in FULL). SmolLM2-135M: LoRA on q,v costs 1,920 x r parameters per layer, on all
# linears 10,176 x r, so q,v at r=16 (30,720) and all-linear at r=3 (30,528) are equal-parameter.
EQUAL_PARAMETERS = [lora("lora-qv-r16", 16), lora("lora-all-r3", 3, ALL_LINEAR)]
FULL_FT = [Experiment("full-finetuning", "full", {"method": "full"})]
# Rank sweep (as rsLoRA's paper: one alpha per scaling rule, the same at every rank, one lr). LoRA scales by
# alpha / r with alpha 16; rsLoRA by alpha / sqrt(r) with alpha 2 sqrt(8), so that both equal the lead lora-all-r8
# (alpha 2r = 16, scale 2) at r=8, which is then the r=8 point of both: the comparison is how each rule's accuracy
# moves away from the same model as the rank grows (LoRA's scale shrinks as 1/r, rsLoRA's as 1/sqrt(r)).
LORA_LEAD = lora("lora-all-r8", 8, ALL_LINEAR)
LORA_ALPHA, RSLORA_ALPHA = 16.0, 2 * math.sqrt(8)
RANKS_QUICK = (8, 64)
RANKS_FULL = (1, 4, 8, 16, 64)


def rank_name(rank: int, rslora: bool) -> str:
    """The rank sweep's experiment at `rank` (the lead at r=8 for both rules)."""
    if rank == 8:
        return LORA_LEAD.name
    return f"rslora-all-r{rank}-a{RSLORA_ALPHA:.2f}" if rslora else f"lora-all-r{rank}-a{LORA_ALPHA:g}"


def rank_sweep(ranks: tuple[int, ...]) -> list[Experiment]:
    out = []
    for r in (r for r in ranks if r != 8):
        out.append(lora(rank_name(r, False), r, ALL_LINEAR, alpha=LORA_ALPHA))
        out.append(lora(rank_name(r, True), r, ALL_LINEAR, alpha=RSLORA_ALPHA, use_rslora=True))
    return out


def others() -> list[Experiment]:
    """One experiment or more per other method family (FULL only)."""
    return [
        lora("dora-all-r8", 8, ALL_LINEAR, use_dora=True),
        Experiment("ia3-default", "scale", {"method": "ia3"}),
        Experiment("prefix-20", "virtual", {"method": "prefix", "num_virtual_tokens": 20}),
        lora("lora-qv-r8", 8),
        Experiment("pissa-all-r8", "lora", {"method": "lora", "rank": 8, "target_modules": ALL_LINEAR, "init": "pissa"}),
        Experiment("olora-all-r8", "lora", {"method": "lora", "rank": 8, "target_modules": ALL_LINEAR, "init": "olora"}),
        Experiment("qlora-all-r8", "lora", {"method": "qlora", "rank": 8, "target_modules": ALL_LINEAR}),
        Experiment("freeze-finetuning", "full", {"method": "freeze"}),
        Experiment("vera-r256", "scale", {"method": "vera", "rank": 256}),
        Experiment("prompt-20", "virtual", {"method": "prompt", "num_virtual_tokens": 20}),
        Experiment("adapter-houlsby", "bottleneck", {"method": "adapter", "variant": "houlsby"}),
        Experiment("adapter-pfeiffer", "bottleneck", {"method": "adapter", "variant": "pfeiffer"}),
        Experiment("adapter-parallel", "bottleneck", {"method": "adapter", "variant": "parallel"}),
        Experiment("oft-all", "rotation", {"method": "oft", "target_modules": ALL_LINEAR}),
        Experiment("lokr-all-r8", "rotation", {"method": "lokr", "rank": 8, "target_modules": ALL_LINEAR}),
        Experiment("loha-all-r8", "rotation", {"method": "loha", "rank": 8, "target_modules": ALL_LINEAR}),
    ] + [lora(f"lora-qv-r{r}", r) for r in (1, 4, 32, 64)] + [lora(f"lora-all-r{r}", r, ALL_LINEAR) for r in (1, 32)]


def experiments(quick: bool) -> list[Experiment]:
    """Every experiment of the mode, findings first (a QUICK run stopped early still has them)."""
    found = [LORA_LEAD, *FULL_FT, *EQUAL_PARAMETERS, *rank_sweep(RANKS_QUICK if quick else RANKS_FULL)]
    return found if quick else found + others()
