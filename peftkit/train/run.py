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
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit.core.archs import enable_checkpointing
from peftkit.core.counting import trainable_parameters
from peftkit.core.inject import apply_method
from peftkit.core.method import Method
from peftkit.core.registry import get_method
from peftkit.core.state import prompt_format as prompt_format_of
from peftkit.data.chat_templates import use_chat_template
from peftkit.data.prompting import default_prompt_format
from peftkit.errors import PeftkitError
from peftkit.io.adapters import save_adapter
from peftkit.io.models import check_vocabulary, load_model, save_model_folder
from peftkit.io.prompt_format import check_prompt_format
from peftkit.train import splits
from peftkit.train.checkpoints import Position, load_checkpoint
from peftkit.train.checkpoints.claim import claim
from peftkit.train.checkpoints.rundir import RunDir
from peftkit.train.config import TrainConfig, resolve_defaults, save_config
from peftkit.train.devices.precision import auto_precision, make_accelerator, upcast_trainable
from peftkit.train.devices.sharding import is_sharded, whole_model, wraps_training
from peftkit.train.devices.speed import apply_speed_settings
from peftkit.train.evaluation.heldout import exact_match
from peftkit.train.evaluation.loading import Loaded
from peftkit.train.init_data import initialise_adapters
from peftkit.train.loop.fit import Loop, fit
from peftkit.train.loop.loss import loss_path
from peftkit.train.loop.optim import optimizer_and_schedule, parameter_groups, total_steps
from peftkit.train.objectives.base import ObjectiveRun, get_objective
from peftkit.train.reporting.memory_report import report_memory
from peftkit.train.reporting.metrics import Metrics, Progress, plot_loss
from peftkit.train.reporting.tracking import Tracking, tracker_names

if TYPE_CHECKING:
    from peftkit.io.models import CausalLM

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """Where a run's outputs are, how evaluation changed, and the trained model (to use or score without a reload)."""

    run_dir: RunDir | None
    saved: Path | None = None
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    steps: int = 0
    wall_s: float = 0.0
    summary: dict = field(default_factory=dict)
    main: bool = True               # False on the other processes of a distributed run (they print nothing)
    trained: Loaded | None = None   # the model in memory, as load_for_inference loads it (None: dry or sharded run)


@dataclass
class Session:
    """Everything `train` builds before the first step (see `prepare`)."""

    cfg: TrainConfig
    method: Method
    accelerator: Any
    model: CausalLM  # the loaded model (`_run` trains the wrapper accelerate prepares around it)
    tokenizer: Any
    prompt_format: dict
    train_split: splits.TrainSplit  # the objective's (`Objective.load_splits`)
    eval_split: splits.TrainSplit | None
    plan: Callable[[int], list[list[int]]]  # epoch -> micro-batches of train_split (cached per epoch)
    steps: int
    run_dir: RunDir | None
    resume_from: Path | None      # the checkpoint this run continues from (None: a fresh run)
    share_prefix: bool = False  # batches mark the prompt prefix their rows share (shared_prefix.py)
    held: ExitStack = field(default_factory=ExitStack)  # the run folder's lock until the run ends
    started: float = field(default_factory=time.perf_counter)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def folder(self) -> RunDir:
        """The run folder: every run has one but a dry run (`train` returns before it is needed)."""
        assert self.run_dir is not None, "a dry run has no run folder"
        return self.run_dir


def train(cfg: TrainConfig, progress: bool = True, on_checkpoint: Callable[[int], None] | None = None) -> RunResult:
    """Run `cfg` end to end (see the module docstring); raises PeftkitError on bad input.

    Progress lines go to the `peftkit.train` logger (the CLI prints them); `progress` shows a progress bar;
    `on_checkpoint(step)` is called after each checkpoint is written (tests use it to interrupt a run).
    """
    session = prepare(cfg)
    with session.held:  # the run folder's lock (checkpoints.claim), released when the run ends
        if cfg.dry_run:
            trainable, total = trainable_parameters(session.model)
            return RunResult(None, summary={"trainable": trainable, "total": total, "steps": session.steps})
        with session.folder.fresh(enabled=session.main and session.resume_from is None):
            return _run(session, progress, on_checkpoint)


def prepare(cfg: TrainConfig) -> Session:
    """Take the run folder (its lock: `Session.held`), load the model and data, apply the method, say what will run."""
    cfg = resolve_defaults(cfg)
    method = get_method(cfg.method)
    method.check_setup(method.build_config(cfg.method_options()), gradient_checkpointing=cfg.gradient_checkpointing)
    acc, dtype, precision = make_accelerator(cfg.precision, method.trains_base, tracker_names(cfg.report_to), cfg)
    run_dir, resume_from, held = claim(cfg, acc.is_main_process) if not cfg.dry_run else (None, None, ExitStack())
    with held:  # released here only when preparing fails
        session = _load(cfg, method, acc, dtype, precision, run_dir, resume_from)
        session.held = held.pop_all()
    return session


def _load(cfg: TrainConfig, method: Method, acc: Any, dtype: Any, precision: str, run_dir: RunDir | None,
          resume_from: Path | None) -> Session:
    """`prepare` once the run folder is taken: nothing but its lock file is written yet, so bad input leaves none."""
    from accelerate.utils import set_seed

    say = log.info if acc.is_main_process else (lambda *_args: None)
    load_options = method.load_options(method.build_config(cfg.method_options()))  # qlora: a quantized base
    model, tokenizer = load_model(cfg.model, dtype=dtype, **load_options)
    check_vocabulary(model, tokenizer, cfg.model or "the embedded model")  # before tokens index past the embedding
    ask = use_chat_template(tokenizer, cfg.chat_template) or prompt_format_of(model) or default_prompt_format(tokenizer)
    prompt_format = check_prompt_format(ask, "the prompt format (--chat-template, else the model's own)")
    train_split, eval_split, fmt = splits.load_splits(cfg, tokenizer, prompt_format)
    set_seed(cfg.seed)                    # before the adapter is initialised: same command, same adapter
    apply_method(model, cfg.method, cfg.method_options())
    upcast_trainable(model, precision)
    parameter_groups(model, cfg)          # LoRA+ with no LoRA B to speed up: refused before anything is written
    trainable, total = trainable_parameters(model)
    why = f" (auto: {auto_precision()[1]}; --precision fp32 to change)" if cfg.precision == "auto" else ""
    say(f"model {cfg.model or 'embedded SmolLM2-135M-Instruct'} | method {cfg.method} | trainable {trainable:,} of "
        f"{total:,} parameters ({100 * trainable / total:.3f}%) | precision {precision}{why}")
    say(f"data: {len(train_split)} training examples ({fmt}), {len(eval_split) if eval_split else 0} eval")
    report_memory(cfg, model, precision, say, acc.num_processes)
    plan = splits.plan_fn(train_split, cfg)
    steps = total_steps(cfg, len(plan(0)), acc.num_processes)
    rows = f"<= {cfg.batch_tokens} tokens" if cfg.batch_tokens else f"{cfg.batch_size} examples"
    say(f"{steps} optimizer step{'s' if steps != 1 else ''}, each {cfg.grad_accum} x {acc.num_processes} micro-batches "
        f"(accumulated x processes) of {rows}, lr {cfg.lr}")
    planned = steps * cfg.grad_accum * acc.num_processes * sum(train_split.lengths) // max(len(plan(0)), 1)
    share = apply_speed_settings(model, cfg, precision, acc.device.type, planned, say, sharded=wraps_training(acc))
    return Session(cfg, method, acc, model, tokenizer, prompt_format, train_split, eval_split, plan, steps, run_dir,
                   resume_from, share)


def _run(s: Session, progress: bool, on_checkpoint: Callable[[int], None] | None) -> RunResult:
    """Train, evaluate before and after, save the result and the report (inside the run folder)."""
    cfg, acc, model, main = s.cfg, s.accelerator, s.model, s.main
    say = log.info if main else (lambda *_args: None)
    if main:
        save_config(cfg, s.folder.config)
    acc.wait_for_everyone()
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if not is_sharded(acc):
        model.to(acc.device)      # sharded: prepare places each process's shard (the whole model never moves)
    path = loss_path(model)
    objective = get_objective(cfg.objective).start(s, path)  # batches, loss, statistics, held-out score
    initialise_adapters(model, s.method, cfg.model, s.plan(0), objective)  # EVA, LoftQ: before the optimizer
    optimizer, scheduler = optimizer_and_schedule(model, cfg, s.steps, sharded=wraps_training(acc))
    prepared, optimizer = acc.prepare(model, optimizer)
    pos = Position()
    if s.resume_from is not None:
        pos = load_checkpoint(s.resume_from, model, optimizer, scheduler, acc.process_index, objective)
        say(f"resuming from {s.resume_from} (step {pos.step}, epoch {pos.epoch}, micro-batch {pos.micro})")
    tracking = Tracking.start(acc, s.folder.tracking, s.folder.name, cfg.to_dict()) if main else None
    metrics = Metrics(s.folder, main, keep_until=pos.step if s.resume_from else None, tracking=tracking)
    evaluate = _evaluator(s, metrics, path, objective)
    fresh_before = evaluate(0, generate=True) if cfg.eval_before and not s.resume_from else {}
    before = metrics.earlier_eval(0) if s.resume_from else fresh_before
    _say_eval("before", before, say, objective)
    bar = Progress(s.steps, pos.step, enabled=main and progress)

    def on_log(record: dict) -> None:
        record = {**objective.stats(acc), **record}
        metrics.write("train", record)
        bar.update(record)

    loop = Loop(model=prepared, optimizer=optimizer, scheduler=scheduler, accelerator=acc,
                plan=s.plan, collate=None, objective=objective,
                lengths=s.train_split.lengths, total_steps=s.steps, grad_accum=cfg.grad_accum,
                max_grad_norm=cfg.max_grad_norm, save_steps=cfg.save_steps, eval_steps=cfg.eval_steps,
                keep_checkpoints=cfg.keep_checkpoints, run_dir=s.run_dir, loss_path=path, on_log=on_log,
                on_eval=lambda step: evaluate(step, generate=False),
                on_checkpoint=on_checkpoint or (lambda step: None))
    try:
        pos = fit(loop, pos)
    except BaseException as exc:
        if not isinstance(exc, Exception):  # Ctrl-C, or the CLI's SIGTERM: say how to continue
            _say_interrupted(s)
        metrics.close()
        raise
    finally:
        bar.stop()
    after = evaluate(pos.step, generate=True)
    _say_eval("after", after, say, objective)
    result = RunResult(s.run_dir, before=before, after=after, steps=pos.step, main=main,
                       trained=None if is_sharded(acc) else Loaded(model, s.tokenizer, s.prompt_format))
    with whole_model(acc, prepared, not s.method.trains_base, "the trained result") as writer:  # sharded: gathered
        if writer:
            _finish(s, result, metrics, pos)
    metrics.close()  # flush the trackers
    acc.wait_for_everyone()
    return result


def _evaluator(s: Session, metrics: Metrics, path: str, objective: ObjectiveRun) -> Callable[..., dict]:
    """evaluate(step, generate) -> the objective's held-out score (and exact match when generating) on the main
    process, recorded."""
    eval_split = s.eval_split
    if eval_split is None:
        return lambda step, generate: {}

    def evaluate(step: int, generate: bool) -> dict:
        result: dict[str, Any] = {}
        if s.main or is_sharded(s.accelerator):  # sharded: every process takes part in each forward
            with s.accelerator.autocast():  # under amp: half-precision base weights meet fp32 adapter weights
                result = objective.evaluate(s.model, path)
                if generate and eval_split.references and "exact_match" not in result:  # not derived
                    result.update(exact_match(s.model, s.tokenizer, eval_split.references, s.prompt_format))
            if s.main:
                metrics.write("eval", {"step": step, **result})
        s.accelerator.wait_for_everyone()
        return result

    return evaluate


def _finish(s: Session, result: RunResult, metrics: Metrics, pos: Position) -> None:
    """Save the trained result, the loss curve and summary.json (main process)."""
    result.saved = _save(s.model, s.tokenizer, s.folder, s.method, s.prompt_format)
    plot_loss(metrics.read(), s.folder.curve, f"{s.cfg.method} on {s.cfg.model or 'SmolLM2-135M-Instruct'}")
    result.wall_s = time.perf_counter() - s.started
    trainable, total = trainable_parameters(s.model)
    losses = [r["loss"] for r in metrics.read() if r.get("kind") == "train" and r.get("loss") is not None]
    summary = {"steps": pos.step, "tokens": pos.tokens, "wall_s": round(result.wall_s, 1), "before": result.before,
               "after": result.after, "saved": str(result.saved), "trainable_parameters": trainable,
               "total_parameters": total, "last_train_loss": losses[-1] if losses else None}
    s.folder.summary.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    result.summary = summary


def _say_interrupted(s: Session) -> None:
    """Ctrl-C or SIGTERM: where the newest checkpoint is and the command that continues from it."""
    if not s.main:
        return
    if newest := (s.run_dir.latest_checkpoint() if s.run_dir else None):
        log.warning("interrupted; the newest checkpoint is %s: continue with `peftkit train ... --output %s --resume` "
                    "(the same options)", newest, s.run_dir)
    else:
        log.warning("interrupted before the first checkpoint (--save-steps N writes them); nothing to resume")


def _save(model: CausalLM, tokenizer: Any, run_dir: RunDir, method: Method, prompt_format: dict) -> Path:
    """The trained result: a whole model folder (methods that train the base) or the adapter in PEFT format.

    If it cannot be written (a full disk, a read-only or vanished folder), the trained weights are not lost: they
    are written to a rescue folder in the system's temporary folder (often another filesystem), and the error
    names it and the newest checkpoint.
    """
    try:
        return _write_result(model, tokenizer, run_dir, method, prompt_format)
    except OSError as exc:
        rescue = RunDir.rescue()
        newest = f"; the newest checkpoint is {latest}" if (latest := run_dir.latest_checkpoint()) else ""
        try:
            kept = _write_result(model, tokenizer, rescue, method, prompt_format)
        except OSError as again:
            raise PeftkitError(f"could not save the trained result in {run_dir} ({exc.strerror or exc}) nor in "
                               f"{rescue} ({again.strerror or again}){newest}") from None
        raise PeftkitError(f"could not save the trained result in {run_dir} ({exc.strerror or exc}); the trained "
                           f"weights were saved to {kept} instead{newest}") from None


def _write_result(model: CausalLM, tokenizer: Any, folder: RunDir, method: Method, prompt_format: dict) -> Path:
    if method.trains_base:
        return save_model_folder(model, tokenizer, folder.model, {"method": method.name, "prompt_format": prompt_format})
    return save_adapter(model, folder.adapter, prompt_format=prompt_format)


def _say_eval(when: str, result: dict, say: Callable[[str], None], objective: ObjectiveRun) -> None:
    if result:
        say(f"eval {when}: {objective.describe(result)}")
