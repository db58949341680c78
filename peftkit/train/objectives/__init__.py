"""Training objectives: the `Objective` interface and registry (base.py) and one module per objective. Importing
this package registers the built-ins, in this order: sft, dpo, orpo, simpo, kto, grpo; plugins come from the
`peftkit.objectives` entry points on the first lookup (docs/architecture.md, "Training objectives")."""

# The import order is the registration order (each module registers itself).
# isort: off
from peftkit.train.objectives import sft  # noqa: F401
from peftkit.train.objectives import dpo  # noqa: F401
from peftkit.train.objectives import orpo  # noqa: F401
from peftkit.train.objectives import simpo  # noqa: F401
from peftkit.train.objectives import kto  # noqa: F401
from peftkit.train.objectives import grpo  # noqa: F401
# isort: on
from peftkit.train.objectives.base import (
    Objective,
    ObjectiveRun,
    declared_options,
    get_objective,
    objective_names,
    register_objective,
)

__all__ = ["Objective", "ObjectiveRun", "declared_options", "get_objective", "objective_names", "register_objective"]
