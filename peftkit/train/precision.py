"""Precision: which accelerator settings and base-weight dtype a `--precision` choice means.

    fp32   weights, gradients, optimizer states and activations in fp32
    bf16   "pure" bf16: weights, gradients and optimizer states in bf16
    amp    fp32 master copies of the trained weights with bf16 autocast; a frozen base is stored in bf16 (it is
           never updated, so an fp32 copy buys nothing); a whole-model fine-tune keeps every weight in fp32
    fp16   like amp with fp16 autocast and loss scaling (a GPU only)
    auto   amp on a GPU with bf16 support, else fp32
"""

from __future__ import annotations

from typing import Any

import torch

from peftkit.errors import PeftkitError


def make_accelerator(precision: str, trains_base: bool = False, cfg: Any = None) -> tuple[Any, torch.dtype, str]:
    """(Accelerator, dtype to load the base weights in, resolved precision name).

    trains_base: the method trains the base weights (full / freeze), which then stay fp32 under amp / fp16.
    cfg: the TrainConfig, for its sharding options (`--fsdp`, `--deepspeed`: peftkit/train/sharding.py).
    """
    from accelerate.state import AcceleratorState

    from peftkit.train.sharding import build_accelerator

    gpu = torch.cuda.is_available()
    if precision == "auto":
        precision = "amp" if gpu and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not gpu:
        raise PeftkitError("--precision fp16 needs a GPU (fp16 autocast with loss scaling); use fp32 or bf16 on a CPU")
    mixed = {"amp": "bf16", "fp16": "fp16"}.get(precision, "no")
    AcceleratorState._reset_state()  # a fresh precision setting per run when several runs share one process
    acc = build_accelerator(not gpu, mixed, cfg)
    half_base = precision == "bf16" or (precision in ("amp", "fp16") and not trains_base)
    dtype = {"fp16": torch.float16}.get(precision, torch.bfloat16) if half_base else torch.float32
    return acc, dtype, precision


def upcast_trainable(model: torch.nn.Module, precision: str) -> None:
    """Under amp / fp16 the trainable parameters are fp32 master weights (autocast runs the matmuls in half)."""
    if precision in ("amp", "fp16"):
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
