"""`TrainingSetup`: everything about a run that decides its memory, validated once.

The method is a registered one (`peftkit.core.registry`), built-in or a plugin; its options are named as its config
fields (r, lora_alpha, target_modules, layers, bits, ...: the vocabulary of `Method.field_options`). The setup builds
the method's config (`Method.build_config`: the method's own defaults and validation) and asks the method whether
it runs in this setup (`Method.check_setup`); the estimator then asks the method about its memory through the hooks
on `peftkit.core.method.Method`, so nothing here or in the formulas names a method.

Precision regimes (the trainer's, see peftkit/train/devices/precision.py):
- fp32: weights, gradients, optimizer states and activations in fp32;
- bf16: "pure" bf16: weights, gradients, optimizer states and activations in bf16;
- amp:  trainable weights kept in fp32 ("master" weights, fp32 gradients and states) and the forward/backward run
        under bf16 autocast. Frozen base weights are held in bf16: they are never updated, so an fp32 copy would buy
        nothing (this is what PEFT recipes and LLaMA-Factory do). When the method trains the base, those weights
        are trainable, so fp32.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from peftkit.core.registry import get_method
from peftkit.errors import PeftkitError
from peftkit.memory.generation import Rollout

if TYPE_CHECKING:
    from peftkit.core.method import Method

PRECISIONS = ("fp32", "bf16", "amp")
OPTIMIZERS = ("adamw", "adamw-8bit", "sgd")


@dataclass(frozen=True)
class TrainingSetup:
    """One training configuration. `method_options` holds fields of the method's config (r, target_modules, bits, ...);
    `config` is the method's config built from them (its defaults fill the rest).

    Sharding: `zero` is the DeepSpeed ZeRO stage (`--deepspeed zeroN`, see `peftkit.io.deepspeed.deepspeed_stage`)
    (0 = plain DDP; 1 shards optimizer states, 2 also gradients, 3 also weights); `fsdp=True` is FSDP full sharding,
    which shards like ZeRO-3. `offload` moves optimizer states (and, at stage 3, weights) to CPU memory.
    `rollout`: how an objective that samples (GRPO) samples before each step; `batch_size` then counts the rows
    trained per micro-batch (prompts x completions per prompt).
    """

    method: str = "full"
    precision: str = "amp"
    optimizer: str = "adamw"
    batch_size: int = 1
    seq_len: int = 2048
    gradient_checkpointing: bool = False
    gpus: int = 1
    zero: int = 0
    fsdp: bool = False
    offload: bool = False
    method_options: dict[str, Any] = field(default_factory=dict)
    rollout: Rollout | None = None  # an objective that samples before each step (memory/generation.py)

    def __post_init__(self) -> None:
        if isinstance(self.rollout, dict):  # asdict(setup) of an estimate, rebuilt (trace_estimate.py)
            object.__setattr__(self, "rollout", Rollout(**self.rollout))
        object.__setattr__(self, "method", self.method.lower())
        object.__setattr__(self, "precision", self.precision.lower())
        object.__setattr__(self, "optimizer", self.optimizer.lower())
        method = get_method(self.method)  # an unknown name is an error listing the registered methods
        _choice("precision", self.precision, PRECISIONS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        for name, most in (("batch_size", 1 << 20), ("seq_len", 1 << 24), ("gpus", 4096)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= most:
                raise PeftkitError(f"{name.replace('_', '-')} must be a whole number from 1 to {most:,}, got {value!r}")
        if self.zero not in (0, 1, 2, 3):
            raise PeftkitError(f"zero must be 0, 1, 2 or 3, got {self.zero!r}")
        if self.fsdp and self.zero:
            raise PeftkitError("choose either --fsdp or --deepspeed, not both (FSDP full sharding is like ZeRO-3)")
        if self.offload and not (self.zero or self.fsdp):
            raise PeftkitError("--offload needs sharding: pass --deepspeed zero1|zero2|zero3 or --fsdp (offload is a "
                               "ZeRO/FSDP feature)")
        config = method.build_config(_own_options(method, self.method_options))
        method.check_setup(config, gradient_checkpointing=self.gradient_checkpointing)
        object.__setattr__(self, "_config", config)  # not a field: asdict(setup) stays plain and JSON-ready

    @property
    def registered_method(self) -> Method:
        """The registered method (the object the estimator asks about its memory)."""
        return get_method(self.method)

    @property
    def config(self) -> Any:
        """The method's config: `method_options` over the config class's defaults, validated by the method."""
        return vars(self)["_config"]  # set in __post_init__, deliberately not a dataclass field

    def option(self, key: str, default: Any) -> Any:
        """A method option as given, or `default` when it was not given (the built `config` has the method's own)."""
        return self.method_options.get(key, default)

    @property
    def shard_stage(self) -> int:
        """What is sharded across GPUs: 0 nothing, 1 optimizer states, 2 + gradients, 3 + weights (FSDP = 3)."""
        return 3 if self.fsdp else self.zero


def _own_options(method: Method, options: dict[str, Any]) -> dict[str, Any]:
    """`options` keyed by config field (CLI names such as `rank` translated, `Method.field_options`), each checked
    to be a field of the method's config (else a one-line error listing them)."""
    options = method.field_options(options, check=False)
    fields = [f.name for f in dataclasses.fields(method.config_cls)]
    for key in options:
        if key not in fields:
            raise PeftkitError(f"option {key!r} does not apply to method {method.name!r} (its options: "
                               f"{', '.join(fields) or 'none'})")
    return options


def field_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Options named as on the command line (rank, alpha, --set fields) in the estimator's vocabulary: the
    registered method's config fields (`Method.field_options`). Whether each applies is checked by `TrainingSetup`."""
    return get_method(method.lower()).field_options(options, check=False)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise PeftkitError(f"unknown {name} {value!r}; choose one of: {', '.join(allowed)}")
