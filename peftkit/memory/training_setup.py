"""`TrainingSetup`: everything about a run that decides its memory, validated once.

Method options are named as the methods' config fields (r, lora_alpha, target_modules, layers, ...: the
vocabulary of `Method.field_options`); qlora's (bits, quant_type, double_quant, compute_dtype) are its config's.

Precision regimes (the trainer's, see peftkit/train/precision.py):
- fp32: weights, gradients, optimizer states and activations in fp32;
- bf16: "pure" bf16: weights, gradients, optimizer states and activations in bf16;
- amp:  trainable weights kept in fp32 ("master" weights, fp32 gradients and states) and the forward/backward run
        under bf16 autocast. Frozen base weights are held in bf16: they are never updated, so an fp32 copy would buy
        nothing (this is what PEFT recipes and LLaMA-Factory do). Under `full`, every weight is trainable, so fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peftkit.core.registry import get_method
from peftkit.errors import PeftkitError

METHODS = ("full", "freeze", "lora", "qlora", "adapter", "prefix", "prompt")
PRECISIONS = ("fp32", "bf16", "amp")
OPTIMIZERS = ("adamw", "adamw-8bit", "sgd")
QUANT_BITS = (4, 8)
DEEPSPEED_PRESETS = {"zero1": 1, "zero2": 2, "zero3": 3}  # `--deepspeed NAME` -> ZeRO stage
PEFT_METHODS = ("lora", "qlora", "adapter", "prefix", "prompt")

# Options that mean something only for some methods: option -> the methods it applies to.
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "r": ("lora", "qlora"),
    "lora_alpha": ("lora", "qlora"),
    "target_modules": ("lora", "qlora"),
    "bits": ("qlora",),
    "reduction_factor": ("adapter",),
    "variant": ("adapter",),
    "num_virtual_tokens": ("prefix", "prompt"),
    "layers": ("freeze",),
}


@dataclass(frozen=True)
class TrainingSetup:
    """One training configuration. `method_options` holds method fields (r, target_modules, bits, ...).

    Sharding: `zero` is the DeepSpeed ZeRO stage (`--deepspeed zeroN`, see `deepspeed_stage`) (0 = plain DDP; 1 shards optimizer states, 2 also gradients,
    3 also weights); `fsdp=True` is FSDP full sharding, which shards like ZeRO-3. `offload` moves optimizer states
    (and, at stage 3, weights) to CPU memory.
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", self.method.lower())
        object.__setattr__(self, "precision", self.precision.lower())
        object.__setattr__(self, "optimizer", self.optimizer.lower())
        _choice("method", self.method, METHODS)
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
        if self.method == "prefix" and self.gradient_checkpointing:
            raise PeftkitError("prefix tuning cannot train with gradient checkpointing (transformers drops the KV cache "
                               "that holds the prefix); drop --gradient-checkpointing or pick another method")
        for key, value in self.method_options.items():
            applies = METHOD_OPTIONS.get(key)
            if applies is None:
                if self.method in PEFT_METHODS:
                    continue  # another field of the method's config: the registry's build_config checks it
                own = [k for k, methods in METHOD_OPTIONS.items() if self.method in methods]
                raise PeftkitError(f"option {key!r} does not apply to method {self.method!r} (its options: "
                                   f"{', '.join(own) or 'none'})")
            if self.method not in applies:
                raise PeftkitError(f"option {key!r} does not apply to method {self.method!r} (only {', '.join(applies)})")
            self._check_option(key, value)

    def _check_option(self, key: str, value: Any) -> None:
        shared = get_method(self.method).shared_option(key)  # r, reduction_factor, ...: the options' own check
        if shared is not None:
            shared.check(value, required=True)
        elif key == "layers":
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise PeftkitError(f"{key} must be a positive whole number, got {value!r}")
        elif key == "bits" and value not in QUANT_BITS:
            raise PeftkitError(f"qlora bits must be 4 (NF4) or 8, got {value!r}")

    def option(self, key: str, default: Any) -> Any:
        """A method option, or `default` when it was not given."""
        return self.method_options.get(key, default)

    @property
    def shard_stage(self) -> int:
        """What is sharded across GPUs: 0 nothing, 1 optimizer states, 2 + gradients, 3 + weights (FSDP = 3)."""
        return 3 if self.fsdp else self.zero


def deepspeed_stage(spec: str | None) -> int:
    """The ZeRO stage of a `--deepspeed` value (train and estimate spell it alike): zero1 | zero2 | zero3, or a
    DeepSpeed JSON config (its zero_optimization.stage); 0 when None."""
    from pathlib import Path

    from peftkit.io.fs import read_json_object

    if not spec:
        return 0
    if spec in DEEPSPEED_PRESETS:
        return DEEPSPEED_PRESETS[spec]
    if not spec.endswith(".json"):
        raise PeftkitError(f"--deepspeed must be {', '.join(DEEPSPEED_PRESETS)} or a DeepSpeed .json config file, "
                           f"got {spec!r}")
    if not Path(spec).is_file():
        raise PeftkitError(f"--deepspeed {spec}: no such file (give zero1, zero2, zero3 or a DeepSpeed JSON config)")
    stage = (read_json_object(Path(spec), "a DeepSpeed config").get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise PeftkitError(f"{spec}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return stage


def field_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Options named as on the command line (rank, alpha, --set fields) in the estimator's vocabulary: the
    registered method's config fields (`Method.field_options`). Whether each option applies to the method is
    checked by `TrainingSetup`."""
    _choice("method", method.lower(), METHODS)
    return get_method(method).field_options(options, check=False)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise PeftkitError(f"unknown {name} {value!r}; choose one of: {', '.join(allowed)}")
