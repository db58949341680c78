"""The trainer's memory report: peftkit.memory's estimate for the run about to start (per process), printed once.

An estimate is advisory: when the estimator declines a setup, the trainer says why and trains anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from peftkit.errors import PeftkitError
from peftkit.train.config import TrainConfig
from peftkit.train.objectives.base import get_objective

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel


def memory_estimate(cfg: TrainConfig, model_config: PretrainedConfig, precision: str, processes: int = 1,
                    gpu_memory_gb: float | None = None) -> Any:
    """peftkit.memory's estimate for this run: the one place the trainer (and the web page) talk to the estimator.

    cfg: a resolved config (`resolve_defaults`). precision: the resolved one (`make_accelerator`'s), so `auto` is
    estimated as what it runs as. processes: the launcher's process count; the figure is per process, sharded as
    --fsdp / --deepspeed say. gpu_memory_gb: the GPU to size for (default: this machine's GPU, if any).
    Raises PeftkitError when the estimator declines the setup.
    """
    import torch

    from peftkit.memory import estimate_memory
    from peftkit.memory.training_setup import field_options

    assert cfg.max_length is not None, "a resolved config (resolve_defaults fills max_length)"
    options = field_options(cfg.method, cfg.method_options())
    gpu_gb = gpu_memory_gb
    if gpu_gb is None and torch.cuda.is_available():
        gpu_gb = torch.cuda.get_device_properties(0).total_memory / 1e9
    return estimate_memory(model_config, cfg.method, precision="amp" if precision == "fp16" else precision,
                           batch_size=_rows(cfg),
                           seq_len=cfg.max_length, gpu_memory_gb=gpu_gb,
                           gradient_checkpointing=cfg.gradient_checkpointing, gpus=processes, fsdp=cfg.fsdp,
                           deepspeed=cfg.deepspeed, rollout=get_objective(cfg.objective).rollout(cfg), **options)


def _rows(cfg: TrainConfig) -> int:
    """Rows of max_length per micro-batch in the worst case: --batch-tokens bounds the padded positions (rows x the
    longest row), else batch_size examples of the objective's rows each (a preference pair is two, a GRPO prompt
    its num_generations completions)."""
    assert cfg.max_length is not None and cfg.batch_size is not None, "a resolved config (resolve_defaults)"
    if cfg.batch_tokens:
        return -(-cfg.batch_tokens // cfg.max_length)
    return cfg.batch_size * get_objective(cfg.objective).rows(cfg)


def objective_rows(objective: str, batch_size: int, seq_len: int, options: dict[str, Any]) -> tuple[int, Any]:
    """(rows per micro-batch, the objective's `Rollout` or None) of `batch_size` examples of rows of `seq_len`
    tokens under `objective` with these of its options (`peftkit estimate --objective`): what the trainer's own
    estimate asks of the objective."""
    from peftkit.train.config import load_train_config, resolve_defaults

    cfg = resolve_defaults(load_train_config(None, {"objective": objective, "batch_size": batch_size,
                                                    "max_length": seq_len, **options}))
    chosen = get_objective(objective)
    return batch_size * chosen.rows(cfg), chosen.rollout(cfg)


def report_memory(cfg: TrainConfig, model: PreTrainedModel, precision: str, say: Callable[[str], None], processes: int = 1) -> None:
    """Print the estimate's total and largest parts; warn when it exceeds this GPU's memory."""
    try:
        estimate = memory_estimate(cfg, model.config, precision, processes)
    except PeftkitError as exc:
        say(f"memory estimate: not available ({exc})")
        return
    parts = sorted(estimate.breakdown.items(), key=lambda kv: -kv[1])[:3]
    shown = ", ".join(f"{k.replace('_', ' ')} {v / 1e9:.2f}" for k, v in parts)
    shards = " sharded" if cfg.fsdp or cfg.deepspeed else ""
    say(f"memory estimate: {estimate.total_bytes / 1e9:.2f} GB per device ({processes}{shards} process"
        f"{'es' if processes > 1 else ''}; GB = 1e9 bytes; largest: {shown})")
    if estimate.fits is False:
        say(f"warning: the estimate exceeds this GPU's {estimate.gpu_memory_gb:.1f} GB; lower --batch-size or "
            "--max-length, or use --gradient-checkpointing")
