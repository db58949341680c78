"""Sharded training through accelerate: FSDP2 (`--fsdp`) and DeepSpeed ZeRO (`--deepspeed zero2|zero3|PATH.json`).

FSDP2 (`torch.distributed.fsdp.fully_shard`, built by accelerate's `FullyShardedDataParallelPlugin(fsdp_version=2)`)
shards every parameter, gradient and optimizer state over the processes (full shard: parameters resharded after
the forward). Each decoder layer is its own unit (`auto_wrap_policy="transformer_based_wrap"`: accelerate takes the
layer classes from the model's `_no_split_modules`), so one layer at a time is gathered. A frozen base with
trainable adapters is accepted: FSDP2 needs one dtype among the *trainable* parameters of a unit, which the amp
regime gives (fp32 adapters; the frozen bf16 base is gathered in bf16 through accelerate's MixedPrecisionPolicy).

accelerate turns FSDP on only for accelerator devices. On a CPU-only machine (tests: gloo, several processes) the
accelerator state is switched to FSDP after construction (`_fsdp_on_cpu`), so the same accelerate code path
(`Accelerator.prepare` -> `fsdp2_prepare_model`, its no_sync and gradient clipping) runs there too.

Under sharding no process holds a whole tensor, so saving gathers first: `gathered_state` returns the full
(unsharded) state on the main process (torch.distributed.checkpoint's full-state-dict gathering, offloaded to CPU),
`full_parameters` puts it into the model for the writers (save_adapter, save_model_folder) and takes it out again,
and `check_complete` refuses to let an empty or partial tensor be written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.io.deepspeed import deepspeed_stage

if TYPE_CHECKING:
    from peftkit.train.config import TrainConfig

log = logging.getLogger(__name__)


def build_accelerator(cpu: bool, mixed_precision: str, cfg: TrainConfig | None = None, **options: Any) -> Any:
    """An Accelerator, sharding with FSDP2 or DeepSpeed when `cfg` (a TrainConfig) asks for it, or when the config
    of `accelerate launch` says so; `options` go to the Accelerator as they are (trackers)."""
    from accelerate import Accelerator

    kwargs: dict[str, Any] = dict(options)
    if cfg is not None and cfg.fsdp:
        kwargs["fsdp_plugin"] = fsdp_plugin()
    elif cfg is not None and cfg.deepspeed:
        check_deepspeed_run(cfg)
        kwargs["deepspeed_plugin"] = deepspeed_plugin(cfg.deepspeed, cpu, batch_size=cfg.batch_size,
                                                      grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm,
                                                      precision=cfg.precision)
    acc = Accelerator(cpu=cpu, mixed_precision=mixed_precision, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is None and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and acc.num_processes > 1:
        plugin = getattr(acc.state, "fsdp_plugin", None) or fsdp_plugin()  # `accelerate launch` with an FSDP config
    if plugin is not None and plugin.fsdp_version != 2:
        raise PeftkitError("peftkit shards with FSDP2: set `fsdp_version: 2` in the accelerate config (FSDP1 is not "
                           "supported)")
    if plugin is not None and cpu and acc.num_processes > 1:
        _fsdp_on_cpu(acc, plugin, mixed_precision)
    if "deepspeed_plugin" in kwargs and cpu:
        _deepspeed_on_cpu(acc, kwargs["deepspeed_plugin"], mixed_precision)
    return acc


def fsdp_plugin() -> Any:
    """accelerate's FSDP2 plugin: full shard, one unit per decoder layer (the model's `_no_split_modules`), and
    CPU-RAM-efficient loading: only local rank 0 of each node reads the weights (transformers loads the others on
    the meta device) and `prepare` sends each process its shard, so 8 processes of a 72B model do not each hold it."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                          auto_wrap_policy="transformer_based_wrap", cpu_ram_efficient_loading=True)


def _fsdp_on_cpu(acc: Any, plugin: Any, mixed_precision: str) -> None:
    """Switch a multi-process CPU accelerator (gloo) to accelerate's FSDP2 path, which it enables only on GPUs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    acc.state.fsdp_plugin = plugin
    # both shared states: every AcceleratorState() copies the process state's entries over its own
    PartialState().distributed_type = acc.state.distributed_type = DistributedType.FSDP


def _deepspeed_on_cpu(acc: Any, plugin: Any, mixed_precision: str) -> None:
    """Switch a multi-process CPU accelerator (gloo) to accelerate's DeepSpeed path, which it enables only on
    accelerators: `prepare` then builds the DeepSpeed engine (its CPU accelerator, over the same gloo group)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    plugin.set_mixed_precision(mixed_precision)
    plugin.select(_from_accelerator_state=True)
    acc.state.deepspeed_plugins = plugin
    acc.state._mixed_precision = "no"  # as accelerate does under DeepSpeed: the engine's config holds the precision
    PartialState().distributed_type = acc.state.distributed_type = DistributedType.DEEPSPEED


def deepspeed_config(spec: str, batch_size: int = 1, grad_accum: int = 1, max_grad_norm: float = 1.0,
                     precision: str = "fp32") -> dict[str, Any]:
    """The DeepSpeed config of `--deepspeed zero1|zero2|zero3|PATH.json`: a preset, or the file, with the run's
    micro-batch, accumulation, clipping and bf16 filled in where the file says "auto" or nothing (a value the file
    sets is kept). ZeRO-3 gathers 16-bit weights when saving, so the saved result is whole."""
    from peftkit.io.fs import read_json_object

    stage = deepspeed_stage(spec)
    if spec.endswith(".json"):
        config = read_json_object(Path(spec), "a DeepSpeed config")
    else:
        config = {"zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}}
    if stage == 3:
        config["zero_optimization"].setdefault("stage3_gather_16bit_weights_on_model_save", True)
    filled = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": grad_accum,
              "gradient_clipping": max_grad_norm}
    for key, value in filled.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    if config.get("train_batch_size") == "auto":
        del config["train_batch_size"]  # DeepSpeed derives it from the two above and the world size
    if precision in ("bf16", "amp") and "bf16" not in config and "fp16" not in config:
        config["bf16"] = {"enabled": True}
    return config


def check_deepspeed_run(cfg: TrainConfig) -> None:
    """What peftkit's loop does not do under DeepSpeed, refused before anything is loaded: accumulation (DeepSpeed's
    engine divides each micro-batch's loss by its own count, which the loop's whole-step normalisation already
    does) and checkpoints (DeepSpeed's are pickles, which peftkit does not read back)."""
    if cfg.grad_accum > 1:
        raise PeftkitError("--deepspeed with --grad-accum > 1 is not supported (the DeepSpeed engine scales the loss "
                           "by its own accumulation count); raise --batch-size or the process count, or use --fsdp")
    if cfg.save_steps or cfg.resume:
        raise PeftkitError("--deepspeed runs write no checkpoints (DeepSpeed's checkpoints are pickles, which peftkit "
                           "never loads); drop --save-steps / --resume, or use --fsdp for resumable sharded runs")


def deepspeed_plugin(spec: str, cpu: bool, **run: Any) -> Any:
    """accelerate's DeepSpeedPlugin for `--deepspeed`: needs the deepspeed package, and on a CPU (DeepSpeed's CPU
    accelerator, gloo) several processes (`torchrun --nproc_per_node N`)."""
    from accelerate.utils import DeepSpeedPlugin, is_deepspeed_available

    config = deepspeed_config(spec, **run)
    if not is_deepspeed_available():
        raise PeftkitError("--deepspeed needs the deepspeed package (pip install deepspeed); or shard with --fsdp, "
                           "which shards the same way as ZeRO-3")
    if cpu and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise PeftkitError("--deepspeed on a CPU needs several processes (torchrun --nproc_per_node 2 ...); for one "
                           "process drop it, or shard with --fsdp")
    return DeepSpeedPlugin(hf_ds_config=config)


def wraps_training(accelerator: Any) -> bool:
    """True when FSDP or DeepSpeed (any ZeRO stage) wraps the model and its optimizer."""
    return accelerator.distributed_type in ("FSDP", "DEEPSPEED")


def is_sharded(accelerator: Any) -> bool:
    """True when no process holds whole parameters: FSDP or DeepSpeed ZeRO-3 over several processes."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if accelerator.num_processes < 2 or kind not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return False
    return kind == DistributedType.FSDP or accelerator.state.deepspeed_plugin.zero_stage == 3


def declared_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """{parameter name: its whole shape} (a DTensor's shape is the global one; ZeRO-3 keeps it in `ds_shape`)."""
    return {n: torch.Size(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}


def gathered_state(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The full (unsharded) parameters on the main process ({} on the others); every process must call it.
    `trainable_only`: only what is trained (an adapter), so a 72B frozen base is never gathered."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    # typed as the union of any state's values (optimizer states hold numbers); a model's state holds tensors
    state = cast("dict[str, torch.Tensor]", get_model_state_dict(model, options=options))
    wanted = {n for n, p in model.named_parameters() if p.requires_grad or not trainable_only}
    # a copy: on a CPU the offload is a no-op and the gathered tensor may alias a buffer FSDP frees afterwards
    return {n: t.detach().clone() for n, t in state.items() if n in wanted}


def check_complete(state: dict[str, torch.Tensor], shapes: dict[str, torch.Size], what: str) -> None:
    """Refuse to save a tensor that is empty, 1-D where a matrix is declared, or of another shape than its module
    declares (what a save of one rank's shard, or of a ZeRO-3 placeholder, would write)."""
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise PeftkitError(f"cannot save {what}: the gathered state lacks {missing[:3]} (the sharded gather was "
                           "incomplete); nothing was written")
    for name, shape in shapes.items():
        got = state[name].shape
        if got != shape or state[name].numel() == 0:
            raise PeftkitError(f"cannot save {what}: {name!r} gathered as shape {tuple(got)} but the module declares "
                               f"{tuple(shape)} (a partial or empty shard); nothing was written")


@contextmanager
def full_parameters(model: nn.Module, state: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """`model` with the parameters named in `state` replaced by those whole tensors, restored on exit.

    Tied parameters (one Parameter under two names) get one replacement, so a writer still sees them as tied.
    """
    originals: list[tuple[nn.Module, str, nn.Parameter | None]] = []  # as `_parameters` holds them
    replaced: dict[int, nn.Parameter] = {}
    wrapped = type(model)
    try:
        if type(model).__name__.startswith("FSDP") and len(wrapped.__bases__) == 2:
            model.__class__ = wrapped.__bases__[1]  # fully_shard's FSDP<Class>: writers record the model's own class
        for name, param in model.named_parameters(remove_duplicate=False):
            if name not in state and id(param) not in replaced:
                continue
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            if id(param) not in replaced:
                replaced[id(param)] = nn.Parameter(state[name], requires_grad=param.requires_grad)
            originals.append((owner, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = replaced[id(param)]
        yield model
    finally:
        model.__class__ = wrapped
        for owner, leaf, original in reversed(originals):
            owner._parameters[leaf] = original


@contextmanager
def whole_model(accelerator: Any, prepared: nn.Module, trainable_only: bool, what: str) -> Iterator[bool]:
    """Inside: on the main process, the model (`prepared` unwrapped) holds its whole trained parameters (gathered
    when sharded, checked); yields whether this process should write. Every process must enter it."""
    if not is_sharded(accelerator):
        yield accelerator.is_main_process
        return
    model = accelerator.unwrap_model(prepared)
    wanted = {n for n, p in model.named_parameters() if p.requires_grad or not trainable_only}
    shapes = {n: s for n, s in declared_shapes(model).items() if n in wanted}
    if accelerator.distributed_type == "DEEPSPEED":  # ZeRO-3: the engine consolidates 16-bit weights on rank 0
        state = {n: t.detach().clone() for n, t in (accelerator.get_state_dict(prepared) or {}).items() if n in wanted}
    else:
        state = gathered_state(model, trainable_only)
    if not accelerator.is_main_process:
        yield False
        return
    check_complete(state, shapes, what)
    with full_parameters(model, state):
        yield True
