"""Exact mode: trace one real training step on fake tensors and report the peak of live tensor bytes.

The step is the trainer's: forward with labels (HF's loss upcasts logits to fp32), backward, gradient clipping,
AdamW step, zero_grad(set_to_none). It runs the real HF architecture and the real method modules under
`FakeTensorMode`: shapes, dtypes and storages are real, data is not, so a 72B step costs no memory and seconds.
A `LiveBytes` tracker (live_bytes.py) counts live storages; the same tracker on real tensors is the ground truth
the tests compare against.

How the trace is made faithful to a GPU run:
- Optimizer state exists before the traced step (a warm-up step creates it untracked): the peak of a long run
  is the steady state, not the first step where `exp_avg` / `exp_avg_sq` do not exist yet.
- AdamW is traced with `foreach=True`, which is what CUDA uses by default: it holds one more copy of the
  trainable parameters during the step (`_foreach_sqrt(exp_avg_sq)`), which the CPU default (for-loop) does not.
  So this is traced, not added as a correction.
- HF cannot tell under fake tensors that an unpadded batch needs no attention mask, and would build an S x S mask
  and `repeat_kv` copies of K/V that a real run does not make. The trace registers an attention-mask function
  that returns no mask when the real run would have none (full, unpadded rows without a cache), so SDPA takes
  the same `is_causal` path, with GQA inside the kernel, as on a GPU.

Corrections the CPU trace cannot see are added afterwards and listed (`TraceResult.corrections`): the CUDA
context and the caching allocator's overhead (trace_estimate.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch._subclasses import FakeTensorMode
from transformers import PretrainedConfig

from peftkit.core.archs import enable_checkpointing
from peftkit.core.counting import trainable_parameters
from peftkit.errors import PeftkitError
from peftkit.memory.attention import trace_attention
from peftkit.memory.building import build_meta_model
from peftkit.memory.live_bytes import LiveBytes, StorageTracker
from peftkit.memory.rollout_trace import rollout_loss, trace_rollout
from peftkit.memory.training_setup import TrainingSetup

if TYPE_CHECKING:  # a runtime import of PreTrainedModel loads transformers' modeling code (~2.5 s)
    from transformers import PreTrainedModel


@dataclass
class TraceResult:
    """What the traced step measured. Bytes are exact tensor bytes of one device (no allocator overhead)."""

    peak_bytes: int
    peak_phase: str
    phases: dict[str, dict[str, int]]
    state_bytes: int  # weights + optimizer states + inputs before the step (what lives between steps)
    trainable_params: int
    total_params: int
    seconds: float
    assumptions: list[str] = field(default_factory=list)


def materialize_fake(model: nn.Module) -> None:
    """Replace meta parameters and buffers by fake CPU tensors (call inside FakeTensorMode; ties preserved).

    `model.to_empty()` cannot be used: inside FakeTensorMode it would call `empty_like` on a real meta tensor,
    which the mode refuses, and outside it would allocate real memory.
    """
    new: dict[int, torch.Tensor] = {}
    new_params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in new_params:
                    new_params[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
                module._parameters[name] = new_params[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                if id(b) not in new:
                    new[id(b)] = torch.empty(b.shape, dtype=b.dtype)
                module._buffers[name] = new[id(b)]


def make_optimizer(params: list[nn.Parameter], setup: TrainingSetup, foreach: bool) -> torch.optim.Optimizer:
    """The trainer's optimizer for `setup` (AdamW or SGD with momentum)."""
    if setup.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, foreach=foreach)
    if setup.optimizer == "sgd":
        return torch.optim.SGD(params, lr=1e-4, momentum=0.9, foreach=foreach)
    raise PeftkitError(f"--trace supports optimizers adamw and sgd, not {setup.optimizer!r} (its kernels are GPU-only)")


def train_step(model: PreTrainedModel, opt: torch.optim.Optimizer, ids: torch.Tensor, setup: TrainingSetup,
               counter: LiveBytes) -> None:  # fmt: skip
    """One training step, phases named for the tracker: forward, logits and loss, backward, optimizer step; for a
    setup that samples, the rollout first and the completion-only loss (rollout_trace.py)."""
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=setup.precision == "amp")
    if setup.rollout is not None:
        trace_rollout(model, setup, counter)
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda *_: counter.set_phase("logits and loss"))
    try:
        counter.set_phase("forward")
        with amp:
            loss = (model(input_ids=ids, labels=ids, use_cache=False).loss if setup.rollout is None
                    else rollout_loss(model, ids, setup))
    finally:
        hook.remove()
    counter.set_phase("backward")
    loss.backward()
    del loss
    counter.set_phase("optimizer step")
    params = [p for g in opt.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    counter.set_phase("after step")


def _check_traceable(setup: TrainingSetup) -> None:
    """Refuse what one fake CPU step cannot reproduce: a base the method loads differently (`Method.load_options`:
    qlora's bitsandbytes quantization, whose kernels do not run on fake tensors) and sharded or offloaded runs."""
    loaded = setup.registered_method.load_options(setup.config)
    if loaded:
        shown = ", ".join(f"{k}={v}" for k, v in loaded.items() if v is not None)
        raise PeftkitError(f"--trace cannot run {setup.method}: it loads the base with {shown}, and bitsandbytes' "
                           "quantized kernels do not run on fake CPU tensors")
    if setup.gpus > 1 or setup.shard_stage or setup.offload:
        raise PeftkitError("--trace traces one unsharded device; drop --gpus/--deepspeed/--fsdp/--offload to trace")


def _measure(model: PreTrainedModel, setup: TrainingSetup, foreach: bool, ids: torch.Tensor, start: float) -> TraceResult:
    """Prepare the trainer's state (checkpointing, optimizer with its state), then track one step."""
    if setup.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PeftkitError(f"method {setup.method!r} leaves no trainable parameter on this model")
    opt = make_optimizer(params, setup, foreach)
    _warm_up(opt, params)
    counter = LiveBytes()
    counter.add([*model.parameters(), *model.buffers(), ids, *_state_tensors(opt)])
    state = counter.current
    with _quiet(), StorageTracker(counter):
        train_step(model, opt, ids, setup, counter)
    trainable, total = trainable_parameters(model)
    phases = {k: {"start": v.start, "peak": v.peak, "end": v.end} for k, v in counter.phases.items()}
    notes = [f"optimizer {type(opt).__name__}(foreach={foreach}) with its state already created (steady state)"]
    return TraceResult(counter.peak, counter.peak_phase, phases, state, trainable, total,
                       time.perf_counter() - start, notes)  # fmt: skip


def trace_memory(config: PretrainedConfig, setup: TrainingSetup, foreach: bool = True) -> TraceResult:
    """Trace one steady-state training step of `config` under `setup` on fake tensors (see the module doc)."""
    _check_traceable(setup)
    start = time.perf_counter()
    model = build_meta_model(config, setup)
    with FakeTensorMode(), _quiet(), trace_attention(model):
        materialize_fake(model)
        ids = torch.zeros(setup.batch_size, setup.seq_len, dtype=torch.long)
        return _measure(model, setup, foreach, ids, start)


def measure_real_step(config: PretrainedConfig, setup: TrainingSetup, foreach: bool = True) -> TraceResult:
    """The same step on real CPU tensors with the same tracker: the ground truth the trace is tested against.

    Uses transformers' default attention (no `peftkit_trace` override), so it also checks that the override makes
    the fake step allocate what a real step does. Only for models that fit in RAM.
    """
    _check_traceable(setup)
    start = time.perf_counter()
    model = build_meta_model(config, setup).to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.tie_weights()
    for module in model.modules():  # rotary inv_freq and similar buffers were left empty by to_empty
        original = getattr(module, "original_inv_freq", None)
        if original is not None:
            module.get_buffer("inv_freq").copy_(original)
    ids = torch.randint(0, config.vocab_size, (setup.batch_size, setup.seq_len))
    return _measure(model, setup, foreach, ids, start)


def _warm_up(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Create the optimizer state with one step on zero gradients (not tracked)."""
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _state_tensors(opt: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for state in opt.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' one-time warnings (deprecations) during the trace."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
