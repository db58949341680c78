"""`peftkit estimate`: GPU memory of a training run before launch (analytic; `--trace` for the exact tensor peak).

    peftkit estimate --model qwen1.5-7b --method lora --rank 8 --seq-len 2048 --precision bf16 \
        --gradient-checkpointing --gpus 1 --gpu-memory 80
    peftkit estimate --model qwen1.5-72b --method full --gradient-checkpointing --fsdp --gpus 18 --gpu-memory 80

Sharding is spelled as in `peftkit train`: --fsdp, or --deepspeed zero1|zero2|zero3|CONFIG.json.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from peftkit.cli._app import app
from peftkit.cli._options import (
    Alpha,
    Json,
    NumVirtualTokens,
    Rank,
    ReductionFactor,
    Set,
    TargetModules,
    Variant,
    parse_sets,
    print_json,
)
from peftkit.errors import PeftkitError

if TYPE_CHECKING:
    from peftkit.memory.estimate import MemoryEstimate

ROW_LABELS = {
    "frozen_weights": "frozen weights",
    "trainable_weights": "trainable weights",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "activations": "activations",
    "logits_and_loss": "logits and loss",
    "step_temporaries": "optimizer-step temporaries",
    "generation": "generation (KV cache, merged copy)",
    "overhead": "framework overhead",
}


def estimate_memory(*args, **kwargs) -> MemoryEstimate:
    """`peftkit.memory.estimate.estimate_memory`, imported when called (tests replace this name)."""
    from peftkit.memory.estimate import estimate_memory as run

    return run(*args, **kwargs)


def _print_presets(as_json: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    from peftkit.memory.presets import PRESETS

    if as_json:
        print_json({name: hub for name, (hub, _) in PRESETS.items()})
        return
    table = Table(title="model presets (offline, exact configs; names are case-insensitive)")
    for col in ("preset", "mirrors", "layers", "hidden", "heads / kv"):
        table.add_column(col)
    for name, (hub, f) in PRESETS.items():
        heads = f"{f['num_attention_heads']} / {f['num_key_value_heads']}"
        table.add_row(name, hub, str(f["num_hidden_layers"]), str(f["hidden_size"]), heads)
    Console().print(table)


def _gb(n: float) -> str:
    from peftkit.memory.estimate import GB

    return f"{n / GB:,.2f}"


def _print(est: MemoryEstimate) -> None:
    from rich.console import Console
    from rich.table import Table

    s = est.setup
    console = Console()
    title = (f"{est.model}: {s['method']}, {s['precision']}, {s['optimizer']}, batch {s['batch_size']} x "
             f"{s['seq_len']} tokens{', checkpointing' if s['gradient_checkpointing'] else ''}, {s['gpus']} GPU(s)")
    console.print(f"[bold]{title}[/bold]")  # a line of its own: a table title would wrap to the table's width
    table = Table(caption="GB = 10^9 bytes, per GPU")
    table.add_column("component")
    table.add_column("GB", justify="right")
    for key, label in ROW_LABELS.items():
        table.add_row(label, _gb(est.breakdown[key]))
    table.add_row("[bold]total per GPU[/bold]", f"[bold]{_gb(est.total_bytes)}[/bold]")
    console.print(table)
    console.print(f"parameters: {est.total_params:,} total, {est.trainable_params:,} trainable "
                  f"(the registered method's modules on the meta device); peak during: {est.peak_phase}")  # fmt: skip
    if est.rollout:
        terms = ", ".join(f"{k.replace('_', ' ')} {_gb(v)}" for k, v in est.rollout.items() if "/" not in k)
        phases = ", ".join(f"{k[6:]} {_gb(v)}" for k, v in est.rollout.items() if k.startswith("phase/"))
        console.print(f"rollouts (GB): {terms}; tensors per phase: {phases}")
    if est.cpu_offload_bytes:
        console.print(f"offloaded to CPU memory: {_gb(est.cpu_offload_bytes)} GB")
    if est.trace:
        t = est.trace
        console.print(f"traced tensor peak {_gb(t['peak_bytes'])} GB in {t['peak_phase']} ({t['seconds']:.1f} s); "
                      f"corrections: {'; '.join(t['corrections'])}")  # fmt: skip
    if est.gpu_memory_gb is not None:
        verdict = "fits" if est.fits else "does NOT fit"
        console.print(f"{verdict} on one {est.gpu_memory_gb:g} GB GPU with this sharding; GPUs needed: "
                      f"{est.gpus_needed if est.gpus_needed else 'none (plain data parallel does not shard; try --fsdp or --deepspeed zero3)'}; "
                      f"largest batch at this length: {est.max_batch_size}; largest length at this batch: {est.max_seq_len}")  # fmt: skip
    for line in est.assumptions:
        console.print(f"[dim]assumes: {line}[/dim]")


@app.command("estimate")
def estimate_cmd(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Preset (see --list), config.json, model folder or cached hub id.")] = None,
    method: Annotated[str, typer.Option("--method", help="A registered method: full | freeze | lora | qlora | adapter | prefix | prompt, or a plugin's.")] = "lora",
    rank: Rank = None,
    alpha: Alpha = None,
    target_modules: TargetModules = None,
    num_virtual_tokens: NumVirtualTokens = None,
    reduction_factor: ReductionFactor = None,
    variant: Variant = None,
    sets: Set = None,
    precision: Annotated[str, typer.Option("--precision", help="fp32 | bf16 | amp | auto (= amp: the target is a GPU)")] = "auto",
    optimizer: Annotated[str, typer.Option("--optimizer", help="adamw | adamw-8bit | sgd")] = "adamw",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Micro-batch per GPU.")] = 1,
    seq_len: Annotated[int, typer.Option("--seq-len", "--max-length", help="Tokens per row.")] = 2048,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations in the backward pass (less activation memory).")] = False,
    gpus: Annotated[int, typer.Option("--gpus", help="Data-parallel GPU count.")] = 1,
    gpu_memory: Annotated[float | None, typer.Option("--gpu-memory", help="Memory of one GPU in GB (10^9 bytes).")] = None,
    fsdp: Annotated[bool, typer.Option("--fsdp", help="FSDP2 full sharding (as `peftkit train --fsdp`).")] = False,
    deepspeed: Annotated[str | None, typer.Option("--deepspeed", help="DeepSpeed ZeRO as `peftkit train --deepspeed`: zero1 | zero2 | zero3 | a DeepSpeed JSON config.")] = None,
    zero: Annotated[int | None, typer.Option("--zero", hidden=True, help="Renamed: --deepspeed zeroN.")] = None,
    offload: Annotated[bool, typer.Option("--offload", help="Offload optimizer states (and ZeRO-3 weights) to CPU.")] = False,
    objective: Annotated[str | None, typer.Option("--objective", help="A training objective (as `peftkit train --objective`): its rows per example (DPO pairs, GRPO's completions) and, for one that samples, its rollouts (KV cache, sampled logits, reference pass); its options by --set, e.g. --set num_generations=8.")] = None,
    trace: Annotated[bool, typer.Option("--trace", help="Also trace one real step on fake tensors (exact tensor peak).")] = False,
    list_presets: Annotated[bool, typer.Option("--list", help="List the model presets and exit.")] = False,
    as_json: Json = False,
) -> None:
    """Estimate the GPU memory of a training run: breakdown, total per GPU, GPUs needed, largest batch / length."""
    from peftkit.memory.presets import PRESETS
    from peftkit.memory.trace_estimate import traced_estimate
    from peftkit.memory.training_setup import field_options
    from peftkit.train.objectives.base import get_objective
    from peftkit.train.reporting.memory_report import objective_rows

    if zero is not None:
        raise PeftkitError(f"--zero was renamed to match `peftkit train`: use --deepspeed zero{zero}" if zero else
                           "--zero was renamed to match `peftkit train`: leave it out for plain data parallel")
    if list_presets:
        _print_presets(as_json)
        return
    if model is None:
        raise PeftkitError(f"--model is required: a preset ({', '.join(PRESETS)}), a config.json, folder or hub id")
    given = {"rank": rank, "alpha": alpha, "target_modules": target_modules, "num_virtual_tokens": num_virtual_tokens,
             "reduction_factor": reduction_factor, "variant": variant, **parse_sets(sets)}  # fmt: skip
    objective_options, rollout = {}, None
    if objective is not None:  # the objective's own --set keys go to it, the rest to the method
        own = {o.name for o in get_objective(objective).options}
        objective_options = {k: given.pop(k) for k in list(given) if k in own}
        batch_size, rollout = objective_rows(objective, batch_size, seq_len, objective_options)
    options = field_options(method, given)
    kwargs = dict(precision="amp" if precision.lower() == "auto" else precision, optimizer=optimizer,
                  batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=gradient_checkpointing, gpus=gpus,
                  deepspeed=deepspeed, fsdp=fsdp, offload=offload, gpu_memory_gb=gpu_memory, rollout=rollout)  # fmt: skip
    est = estimate_memory(model, method, **kwargs, **options)
    if trace:
        est = traced_estimate(model, est)
    if as_json:
        print_json(est.to_dict())
    else:
        _print(est)
