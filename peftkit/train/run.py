"""One training run from a TrainConfig: validate everything, evaluate, train, evaluate, save, report.

Order matters: the seed is set right before the adapter is initialised (seeding after the init would make two
runs of the same command differ), and every input is validated before the run folder is touched, so bad input
leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.core.archs import enable_checkpointing
from peftkit.core.counting import trainable_parameters
from peftkit.core.inject import apply_method
from peftkit.core.method import Method
from peftkit.core.registry import get_method
from peftkit.core.state import prompt_format as prompt_format_of
from peftkit.data.prompting import default_prompt_format
from peftkit.errors import PeftkitError
from peftkit.io.adapters import save_adapter
from peftkit.io.models import load_model, save_model_folder
from peftkit.train import splits
from peftkit.train.checkpoint import Position, load_checkpoint
from peftkit.train.config import TrainConfig, resolve_defaults, save_config
from peftkit.train.evaluate import eval_loss, exact_match
from peftkit.train.loop import Loop, fit
from peftkit.train.loss import supports_logits_to_keep
from peftkit.train.optim import optimizer_and_schedule, total_steps
from peftkit.train.precision import make_accelerator, upcast_trainable
from peftkit.train.report import CURVE, Metrics, Progress, plot_loss
from peftkit.train.rundir import RUN_CONFIG, check_run_dir, start_run_dir

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """Where a run's outputs are and how evaluation changed."""

    run_dir: Path | None
    saved: Path | None = None
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    steps: int = 0
    wall_s: float = 0.0
    summary: dict = field(default_factory=dict)
    main: bool = True               # False on the other processes of a distributed run (they print nothing)


def memory_estimate(cfg: TrainConfig, model: Any) -> Any:
    """peftkit.memory's estimate for this run (per process): the one place the trainer talks to the estimator.
    Raises PeftkitError when the estimator declines the setup; the caller reports why and trains anyway."""
    import torch

    from peftkit.memory import estimate_memory
    from peftkit.memory.training_setup import field_options

    options = field_options(cfg.method, cfg.method_options())
    gpu_gb = torch.cuda.get_device_properties(0).total_memory / 1e9 if torch.cuda.is_available() else None
    precision = "fp32" if cfg.precision in ("auto", "fp16") and gpu_gb is None else cfg.precision
    return estimate_memory(model.config, cfg.method, precision="amp" if precision in ("auto", "fp16") else precision,
                           batch_size=cfg.batch_size, seq_len=cfg.max_length, gpu_memory_gb=gpu_gb,
                           gradient_checkpointing=cfg.gradient_checkpointing, **options)


def train(cfg: TrainConfig, progress: bool = True, on_checkpoint: Callable[[int], None] | None = None) -> RunResult:
    """Run `cfg` end to end (see the module docstring); raises PeftkitError on bad input.

    Progress lines go to the `peftkit.train` logger (the CLI prints them); `progress` shows a progress bar;
    `on_checkpoint(step)` is called after each checkpoint is written (tests use it to interrupt a run).
    """
    from accelerate.utils import set_seed

    t0 = time.perf_counter()
    cfg = resolve_defaults(cfg)
    method = get_method(cfg.method)
    acc, dtype, precision = make_accelerator(cfg.precision, method.trains_base)
    main = acc.is_main_process
    say = log.info if main else (lambda *_args: None)
    run_dir, resume_from = check_run_dir(cfg) if not cfg.dry_run else (None, None)
    model, tokenizer = load_model(cfg.model, dtype=dtype)
    prompt_format = prompt_format_of(model) or default_prompt_format(tokenizer)
    train_split, eval_split, fmt = splits.load_splits(cfg, tokenizer, prompt_format)
    set_seed(cfg.seed)                    # before the adapter is initialised: same command, same adapter
    apply_method(model, cfg.method, cfg.method_options())
    upcast_trainable(model, precision)
    trainable, total = trainable_parameters(model)
    say(f"model {cfg.model or 'embedded SmolLM2-135M-Instruct'} | method {cfg.method} | trainable {trainable:,} of "
        f"{total:,} parameters ({100 * trainable / total:.3f}%) | precision {precision}")
    say(f"data: {len(train_split)} training examples ({fmt}), {len(eval_split) if eval_split else 0} eval")
    _report_memory(cfg, model, say)
    plan = splits.plan_fn(train_split, cfg)
    steps = total_steps(cfg, len(plan(0)), acc.num_processes)
    say(f"{steps} optimizer step{'s' if steps != 1 else ''} of {cfg.batch_size} x {cfg.grad_accum} x "
        f"{acc.num_processes} examples, lr {cfg.lr}")
    if cfg.dry_run:
        return RunResult(None, summary={"trainable": trainable, "total": total, "steps": steps})
    if main:
        start_run_dir(run_dir, cfg)
        save_config(cfg, run_dir / RUN_CONFIG)
    acc.wait_for_everyone()
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    model.to(acc.device)
    optimizer, scheduler = optimizer_and_schedule(model, cfg, steps)
    keep = supports_logits_to_keep(model)
    collate = splits.collate_fn(train_split, tokenizer.pad_token_id, cfg.packing, acc.device)
    eval_collate = splits.collate_fn(eval_split, tokenizer.pad_token_id, cfg.packing, acc.device) if eval_split else None
    eval_plan = splits.plan_fn(eval_split, cfg, shuffle=False)(0) if eval_split else []
    prepared, optimizer = acc.prepare(model, optimizer)
    pos = Position()
    if resume_from is not None:
        pos = load_checkpoint(resume_from, model, optimizer, scheduler, acc.process_index)
        say(f"resuming from {resume_from} (step {pos.step}, epoch {pos.epoch}, micro-batch {pos.micro})")
    metrics = Metrics(run_dir, main, resume_step=pos.step if resume_from else None)

    def evaluate(step: int, generate: bool) -> dict:
        result: dict[str, Any] = {}
        if main and eval_split:
            with acc.autocast():  # under amp: half-precision base weights meet fp32 adapter weights
                result = eval_loss(model, eval_collate, eval_plan, keep)
                if generate and eval_split.references:
                    result.update(exact_match(model, tokenizer, eval_split.references, prompt_format))
            metrics.write("eval", {"step": step, **result})
        acc.wait_for_everyone()
        return result

    before = _earlier_eval(metrics, 0) if resume_from else evaluate(0, generate=True)
    _say_eval("before", before, say)
    bar = Progress(steps, pos.step, enabled=main and progress)

    def on_log(record: dict) -> None:
        metrics.write("train", record)
        bar.update(record)

    loop = Loop(model=prepared, optimizer=optimizer, scheduler=scheduler, accelerator=acc, plan=plan,
                collate=collate, lengths=train_split.lengths, total_steps=steps, grad_accum=cfg.grad_accum,
                max_grad_norm=cfg.max_grad_norm, save_steps=cfg.save_steps, eval_steps=cfg.eval_steps,
                keep_checkpoints=cfg.keep_checkpoints, run_dir=run_dir, keep_logits=keep, on_log=on_log,
                on_eval=lambda step: evaluate(step, generate=False),
                on_checkpoint=on_checkpoint or (lambda step: None))
    try:
        pos = fit(loop, pos)
    finally:
        bar.stop()
    after = evaluate(pos.step, generate=True)
    _say_eval("after", after, say)
    result = RunResult(run_dir, before=before, after=after, steps=pos.step, main=main)
    if main:
        result.saved = _save(model, tokenizer, run_dir, method, prompt_format)
        plot_loss(metrics.read(), run_dir / CURVE, f"{cfg.method} on {cfg.model or 'SmolLM2-135M-Instruct'}")
        result.wall_s = time.perf_counter() - t0
        summary = {"steps": pos.step, "tokens": pos.tokens, "wall_s": round(result.wall_s, 1), "before": before,
                   "after": after, "saved": str(result.saved)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        result.summary = summary
    acc.wait_for_everyone()
    return result


def _save(model: Any, tokenizer: Any, run_dir: Path, method: Method, prompt_format: dict) -> Path:
    """The trained result: a whole model folder (methods that train the base) or the adapter in PEFT format."""
    if method.trains_base:
        return save_model_folder(model, tokenizer, run_dir / "model", {"method": method.name, "prompt_format": prompt_format})
    return save_adapter(model, run_dir / "adapter", prompt_format=prompt_format)


def _earlier_eval(metrics: Metrics, step: int) -> dict:
    """The evaluation recorded at `step` before an interruption (resume does not evaluate the base model again)."""
    found = [r for r in metrics.read() if r["kind"] == "eval" and r["step"] == step]
    return {k: v for k, v in found[-1].items() if k not in ("kind", "step")} if found else {}


def _say_eval(when: str, result: dict, say: Callable[[str], None]) -> None:
    if not result:
        return
    em = result.get("exact_match")
    em_text = f", exact match {em:.0%} of {result['n']}" if em is not None else ""
    say(f"eval {when}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}{em_text}")


def _report_memory(cfg: TrainConfig, model: Any, say: Callable[[str], None]) -> None:
    """Print the estimate's total and largest parts; warn when it exceeds this GPU's memory. An estimate is
    advisory: when the estimator declines the setup, say why and go on."""
    try:
        estimate = memory_estimate(cfg, model)
    except PeftkitError as exc:
        say(f"memory estimate: not available ({exc})")
        return
    parts = sorted(estimate.breakdown.items(), key=lambda kv: -kv[1])[:3]
    shown = ", ".join(f"{k.replace('_', ' ')} {v / 1e9:.2f}" for k, v in parts)
    say(f"memory estimate: {estimate.total_bytes / 1e9:.2f} GB per device (GB = 1e9 bytes; largest: {shown})")
    if estimate.fits is False:
        say(f"warning: the estimate exceeds this GPU's {estimate.gpu_memory_gb:.1f} GB; lower --batch-size or "
            "--max-length, or use --gradient-checkpointing")
