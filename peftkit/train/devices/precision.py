"""Precision: which accelerator settings and base-weight dtype a `--precision` choice means.

    fp32   weights, gradients, optimizer states and activations in fp32
    bf16   "pure" bf16: weights, gradients and optimizer states in bf16
    amp    fp32 master copies of the trained weights with bf16 autocast; a frozen base is stored in bf16 (it is
           never updated, so an fp32 copy buys nothing); a whole-model fine-tune keeps every weight in fp32
    fp16   like amp with fp16 autocast and loss scaling (a GPU only)
    auto   amp where the hardware multiplies bf16 fast: a GPU with bf16, or a CPU with AMX-BF16 or AVX512-BF16
           (oneDNN then runs bf16 matmuls at several times the fp32 rate); fp32 elsewhere. `auto_precision` says
           which it picked and why.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch

from peftkit.errors import PeftkitError
from peftkit.train.checkpoints.rundir import RunDir

if TYPE_CHECKING:
    from peftkit.train.config import TrainConfig


def make_accelerator(precision: str, trains_base: bool = False, log_with: list[str] | None = None,
                     cfg: TrainConfig | None = None) -> tuple[Any, torch.dtype, str]:
    """(Accelerator, dtype to load the base weights in, resolved precision name).

    trains_base: the method trains the base weights (full / freeze), which then stay fp32 under amp / fp16.
    log_with: accelerate tracker names (`tracking.tracker_names`); their folder is set when the run starts.
    cfg: the TrainConfig, for its sharding options (`--fsdp`, `--deepspeed`: peftkit/train/devices/sharding.py).
    """
    from accelerate.state import AcceleratorState

    from peftkit.train.devices.sharding import build_accelerator

    gpu = torch.cuda.is_available()
    precision = resolve_auto(precision)
    if precision == "fp16" and not gpu:
        raise PeftkitError("--precision fp16 needs a GPU (fp16 autocast with loss scaling); use fp32 or bf16 on a CPU")
    mixed = {"amp": "bf16", "fp16": "fp16"}.get(precision, "no")
    AcceleratorState._reset_state()  # a fresh precision setting per run when several runs share one process
    trackers = {"log_with": log_with, "project_dir": RunDir.TRACKING} if log_with else {}  # the folder: Tracking.start
    acc = build_accelerator(not gpu, mixed, cfg, **trackers)
    half_base = precision == "bf16" or (precision in ("amp", "fp16") and not trains_base)
    dtype = {"fp16": torch.float16}.get(precision, torch.bfloat16) if half_base else torch.float32
    return acc, dtype, precision


def inference_autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """The autocast that scoring a model under `precision` means: bf16 autocast where `auto` (or `amp`) picks amp
    (what training's own held-out evaluation runs under), else none (fp32, or weights already in half)."""
    if resolve_auto(precision) != "amp":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def resolve_auto(precision: str) -> str:
    """What `precision` means here: `auto` resolved by `auto_precision`, any other name itself."""
    return auto_precision()[0] if precision == "auto" else precision


def auto_precision() -> tuple[str, str]:
    """(what `--precision auto` means on this machine, why): "amp" where bf16 is fast, else "fp32"."""
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "amp", f"the GPU ({torch.cuda.get_device_name()}) supports bf16"
        return "fp32", f"the GPU ({torch.cuda.get_device_name()}) has no bf16"
    feature = cpu_bf16_feature()
    if feature:
        return "amp", f"the CPU has {feature}"
    return "fp32", "the CPU has neither AMX-BF16 nor AVX512-BF16 (bf16 would be emulated, slower than fp32)"


def cpu_bf16_feature() -> str | None:
    """The CPU's bf16 matmul instructions ("AMX-BF16" or "AVX512-BF16"), or None.

    Asks torch's own cpuinfo-based probes (the ones its oneDNN kernels dispatch on); where a torch build lacks
    them, reads Linux's /proc/cpuinfo flags.
    """
    probes = (("AMX-BF16", "_is_amx_tile_supported", "amx_bf16"), ("AVX512-BF16", "_is_avx512_bf16_supported",
                                                                   "avx512_bf16"))
    flags: set[str] | None = None
    for name, probe, flag in probes:
        check = getattr(torch.cpu, probe, None)
        if check is not None:
            if check():
                return name
            continue
        if flags is None:
            flags = _proc_cpu_flags()
        if flag in flags:
            return name
    return None


def _proc_cpu_flags() -> set[str]:
    """The `flags` line of /proc/cpuinfo as a set (empty where there is no such file)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def upcast_trainable(model: torch.nn.Module, precision: str) -> None:
    """Under amp / fp16 the trainable parameters are fp32 master weights (autocast runs the matmuls in half)."""
    if precision in ("amp", "fp16"):
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
