"""Speed settings of a training run: the attention kernel, compiling the decoder layers, shared prompt prefixes.

Attention (`--attention auto|eager|sdpa`). PyTorch's fused attention (SDPA) is the right default almost
everywhere, but on a CPU under bf16 its backward pass is slow. Measured on the embedded model (a LoRA training
step, eager / SDPA tokens/s): on an AMX-BF16 Xeon eager was ~1.3x faster at 128 tokens and ~0.7x at 512; on an
AVX512-BF16 EPYC 1.14x at 128, 1.06x at 256, 1.08x at 512, then 0.58x at 1024 and 0.43x at 2048 (SDPA's cost grows
more slowly with length). `auto` picks eager on a CPU under bf16 when rows are at most EAGER_MAX_LENGTH tokens,
on the faster side on both CPUs, else leaves the model's own choice (SDPA where it supports it).

Compiling (`--compile / --no-compile`). `torch.compile` of each decoder layer (not the whole model: one graph per
layer class compiles in tens of seconds instead of minutes, and recompiles per layer are shared) fuses the
RMSNorm / RoPE / SiLU / residual elementwise ops and the dtype casts into a few kernels. Dynamic shapes, so
batches of other lengths do not recompile. The inductor cache is kept under peftkit's cache folder, so a second
run of the same model starts compiled in seconds. Compiling costs tens of seconds up front on a cold cache, so
the default (`None` = auto) compiles only runs long enough to win that back: at least COMPILE_MIN_TOKENS tokens.

Shared prefixes (`--share-prefix / --no-share-prefix`, on by default): the prompt tokens every row of a
micro-batch starts with are computed once (shared_prefix.py), where the model and the run allow it. The suffix's
forward hands every decoder layer the KV cache, and a compiled layer guards on that cache's per-layer state, so it
recompiles for each layer until dynamo gives up and runs it uncompiled: the two exclude each other. Sharing wins
when neither is asked for (measured here: 1.3x from sharing on the bundled task, 1.07x from compiling); an explicit
`--compile` turns sharing off.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from peftkit.core.archs import decoder_layers
from peftkit.errors import PeftkitError
from peftkit.io.models import cache_dir
from peftkit.train.loop.shared_prefix import sharing_blocker
from peftkit.train.objectives.base import get_objective

if TYPE_CHECKING:
    from peftkit.train.config import TrainConfig

EAGER_MAX_LENGTH = 256
COMPILE_MIN_TOKENS = 300_000


def choose_attention(requested: str, device_type: str, precision: str, max_length: int) -> tuple[str | None, str]:
    """(attention implementation to set, or None to keep the model's; why)."""
    if requested != "auto":
        return requested, "asked for"
    if device_type == "cpu" and precision in ("amp", "bf16") and max_length <= EAGER_MAX_LENGTH:
        return "eager", f"a CPU under bf16 with rows of at most {EAGER_MAX_LENGTH} tokens: eager trains faster there"
    return None, "the model's default"


def set_attention(model: Any, implementation: str | None) -> str:
    """Switch the model's attention kernel (None: leave it); returns the one in use."""
    if implementation is not None and implementation != model.config._attn_implementation:
        try:
            model.set_attn_implementation(implementation)
        except (ValueError, ImportError) as exc:
            raise PeftkitError(f"--attention {implementation} is not available for this model: {exc}") from None
    return model.config._attn_implementation


def should_compile(requested: bool | None, planned_tokens: int) -> tuple[bool, str]:
    """(compile the decoder layers?, why) from --compile / --no-compile, or the run's size when not given."""
    if requested is not None:
        return requested, "asked for"
    if planned_tokens >= COMPILE_MIN_TOKENS:
        return True, f"a long run ({planned_tokens:,} tokens >= {COMPILE_MIN_TOKENS:,}) wins back the compile time"
    return False, f"a short run ({planned_tokens:,} tokens < {COMPILE_MIN_TOKENS:,}) would not win back the compile time"


def compile_layers(model: Any, backend: str = "inductor") -> int:
    """torch.compile each decoder layer in place (dynamic shapes); returns how many. The inductor cache goes to
    <peftkit cache>/inductor unless TORCHINDUCTOR_CACHE_DIR is set."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
    return len(layers)


def apply_speed_settings(model: Any, cfg: TrainConfig, precision: str, device_type: str, planned_tokens: int,
                         say: Callable[[str], None], sharded: bool = False) -> bool:
    """Set the attention kernel and maybe compile the decoder layers of `model` for the run `cfg` (a TrainConfig,
    defaults resolved); say what was chosen and why. Returns whether batches may share their prompt prefix
    (sharded: FSDP or DeepSpeed wraps the model, from the flags or the launcher's config)."""
    assert cfg.max_length is not None, "a resolved config (resolve_defaults fills max_length)"
    implementation, why = choose_attention(cfg.attention, device_type, precision, cfg.max_length)
    used = set_attention(model, implementation)
    share, blocker = should_share_prefix(model, cfg, sharded)
    compiled, reason = should_compile(cfg.compile, planned_tokens)
    if compiled and share:  # a compiled layer recompiles for each layer's cache object (dynamo's limit is 8)
        if cfg.compile is None:
            compiled, reason = False, "shared prompt prefixes hand each layer a KV cache, which compiling does not take"
        else:
            share, blocker = False, "--compile: a compiled layer would recompile for each layer's KV cache"
    if compiled:
        compile_layers(model)
    say(f"attention {used} ({why}); decoder layers {'compiled' if compiled else 'not compiled'} ({reason})")
    say(f"shared prompt prefixes: {'computed once per micro-batch' if share else 'off'} ({blocker})")
    return share


def should_share_prefix(model: Any, cfg: TrainConfig, sharded: bool = False) -> tuple[bool, str]:
    """(compute the prompt prefix a micro-batch's rows share once?, why) for the run `cfg`."""
    if not cfg.share_prefix:
        return False, "--no-share-prefix"
    if not get_objective(cfg.objective).shares_prefix:
        return False, f"--objective {cfg.objective} batches its rows itself"
    blocker = sharing_blocker(model, cfg.packing, cfg.gradient_checkpointing, sharded or bool(cfg.fsdp or cfg.deepspeed))
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    if blocker is None and window and cfg.max_length > window:  # a sliding cache would drop the prefix's keys
        blocker = f"rows of up to {cfg.max_length} tokens exceed the model's sliding window of {window}"
    return blocker is None, blocker or "--no-share-prefix to turn off"
