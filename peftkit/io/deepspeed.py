"""`--deepspeed` values, as `peftkit train` and `peftkit estimate` both spell them: a preset name or a DeepSpeed
JSON config. Here, below train and memory, so both read the ZeRO stage from one definition."""

from __future__ import annotations

from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.io.fs import read_json_object

DEEPSPEED_PRESETS = {"zero1": 1, "zero2": 2, "zero3": 3}  # `--deepspeed NAME` -> ZeRO stage


def deepspeed_stage(spec: str | None) -> int:
    """The ZeRO stage of a `--deepspeed` value: zero1 | zero2 | zero3, or a DeepSpeed JSON config (its
    zero_optimization.stage, 0 when absent); 0 when None. A bad value is a one-line PeftkitError."""
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
