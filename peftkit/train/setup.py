"""Pieces `run.py` assembles before the loop: defaults, accelerator and precision, the run folder, the optimizer.

Precision (DESIGN.md): fp32; bf16 = pure bf16 weights and optimizer states; amp = fp32 master weights with bf16
autocast; fp16 = fp32 master weights with fp16 autocast and loss scaling (a GPU only); auto = amp on a GPU with
bf16 support, else fp32.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from peftkit.errors import PeftkitError
from peftkit.train.checkpoint import list_checkpoints
from peftkit.train.config import TrainConfig, read_recipe
from peftkit.methods.whole import is_full

RUN_CONFIG = "run_config.yaml"
# From the measurements in peftkit/data/README.md (q,v LoRA r=8, lr 2e-3, batch 8: 86% exact match after 30
# steps; the longest example is 122 tokens): the zero-argument run uses these.
BUNDLED_DEFAULTS = {"lr": 2e-3, "max_steps": 30, "batch_size": 8, "max_length": 128}
GENERIC_DEFAULTS = {"batch_size": 4, "max_length": 512}
DEFAULT_LR = {"full": 2e-5, "freeze": 5e-5}


def resolve_defaults(cfg: TrainConfig) -> TrainConfig:
    """Fill the `None` fields: bundled-task defaults when no --data, else generic ones; lr per method."""
    base = BUNDLED_DEFAULTS if cfg.data is None else GENERIC_DEFAULTS
    fill = {k: v for k, v in base.items() if getattr(cfg, k) is None}
    if cfg.data is None and cfg.max_steps is None and cfg.epochs != 1.0:
        fill.pop("max_steps", None)  # an explicit --epochs wins over the bundled step count
    if cfg.lr is None and (cfg.data is not None or is_full(cfg.method)):
        fill["lr"] = DEFAULT_LR.get(cfg.method, 2e-4)
    return dataclasses.replace(cfg, **fill)


def make_accelerator(precision: str, method: str = "lora") -> tuple[Any, torch.dtype, str]:
    """(Accelerator, dtype to load the base weights in, resolved precision name).

    Under amp the frozen base weights are loaded in bf16 (they are never updated, so an fp32 copy buys nothing)
    and `upcast_trainable` keeps the trained parameters in fp32; a full fine-tune loads everything in fp32.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    gpu = torch.cuda.is_available()
    if precision == "auto":
        precision = "amp" if gpu and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not gpu:
        raise PeftkitError("--precision fp16 needs a GPU (fp16 autocast with loss scaling); use fp32 or bf16 on a CPU")
    mixed = {"amp": "bf16", "fp16": "fp16"}.get(precision, "no")
    AcceleratorState._reset_state()  # a fresh precision setting per run when several runs share one process
    acc = Accelerator(cpu=not gpu, mixed_precision=mixed)
    half_base = precision == "bf16" or (precision in ("amp", "fp16") and not is_full(method))
    dtype = {"fp16": torch.float16}.get(precision, torch.bfloat16) if half_base else torch.float32
    return acc, dtype, precision


def upcast_trainable(model: torch.nn.Module, precision: str) -> None:
    """Under amp / fp16 the trainable parameters are fp32 master weights (autocast runs the matmuls in half)."""
    if precision in ("amp", "fp16"):
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()


def default_run_dir(method: str) -> Path:
    return Path("runs") / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_dir(cfg: TrainConfig) -> tuple[Path, Path | None]:
    """(run folder, checkpoint to resume or None), refusing a folder that holds another run (nothing is written).

    --resume with no --output resumes the newest runs/<method>-* folder.
    """
    if cfg.output:
        run_dir = Path(cfg.output)
    elif cfg.resume:
        found = sorted(Path("runs").glob(f"{cfg.method}-*"))
        if not found:
            raise PeftkitError(f"--resume: no run folder runs/{cfg.method}-* to resume; pass --output RUN_FOLDER")
        run_dir = found[-1]
    else:
        run_dir = default_run_dir(cfg.method)
    if cfg.resume:
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            raise PeftkitError(f"--resume: {run_dir} holds no checkpoint (checkpoints are saved every --save-steps)")
        _check_same_run(run_dir, cfg)
        return run_dir, ckpts[-1]
    if run_dir.exists() and any(run_dir.iterdir()) and not cfg.overwrite:
        raise PeftkitError(f"output folder {run_dir} is not empty (it holds another run); pass --overwrite to "
                           "replace it, --resume to continue it, or choose another --output")
    return run_dir, None


RESUME_MAY_CHANGE = {"resume", "overwrite", "output", "max_steps", "epochs", "save_steps", "eval_steps", "log_steps",
                     "keep_checkpoints", "dry_run"}


def _check_same_run(run_dir: Path, cfg: TrainConfig) -> None:
    """Resuming with different model / data / hyper-parameters would silently train something else: refuse."""
    saved_file = run_dir / RUN_CONFIG
    if not saved_file.is_file():
        return
    saved = read_recipe(saved_file)
    now = cfg.to_dict()
    diff = [k for k in saved if k not in RESUME_MAY_CHANGE and saved[k] != now.get(k)]
    if diff:
        shown = ", ".join(f"{k}: {saved[k]!r} -> {now.get(k)!r}" for k in diff[:4])
        raise PeftkitError(f"--resume: the options differ from the run in {run_dir} ({shown}); resume with the "
                           f"original options (saved in {saved_file})")


def start_run_dir(run_dir: Path, cfg: TrainConfig) -> None:
    """Create (or, with --overwrite, empty) the run folder; called only after every input was validated."""
    if cfg.overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def total_steps(cfg: TrainConfig, micro_per_epoch: int, world: int) -> int:
    """Optimizer steps: --max-steps, else epochs x micro-batches per epoch / (grad_accum x processes)."""
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * micro_per_epoch / (cfg.grad_accum * world)))


def optimizer_and_schedule(model: torch.nn.Module, cfg: TrainConfig, steps: int) -> tuple[Any, Any]:
    """AdamW over the trainable parameters, and a LambdaLR: linear warmup, then cosine / linear / constant."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PeftkitError("the model has no trainable parameter; check the method options")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup * steps) if cfg.warmup < 1 else int(cfg.warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, steps - warmup)
        if cfg.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
