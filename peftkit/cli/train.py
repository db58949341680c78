"""`peftkit train`: fine-tune a model with any registered method (or full / freeze) on accelerate.

    peftkit train --method lora --rank 8                    # embedded SmolLM2-135M on the bundled task
    peftkit train --config recipes/lora.yaml --lr 1e-4      # a recipe; flags override its keys
    torchrun --nproc_per_node 2 cli.py train ...            # the same command on several processes

Flags left unset do not override the recipe; every flag is also a recipe key (dashes become underscores).
"""

from __future__ import annotations

import inspect
import shlex
from collections.abc import Callable
from typing import Annotated

import typer

from peftkit.cli._app import app
from peftkit.cli._options import (
    Alpha,
    Dropout,
    Method,
    Model,
    NumVirtualTokens,
    Output,
    Overwrite,
    Rank,
    ReductionFactor,
    Set,
    TargetModules,
    Variant,
    parse_sets,
)

Opt = typer.Option


def _with_objective_flags(command: Callable) -> Callable:
    """`command` with one keyword flag per option the registered objectives declare (`Option`: flags, type,
    help; train/objectives/), in place of its `**objective_options`, so a new objective's options reach the CLI."""
    from peftkit.train.objectives.base import declared_options

    signature = inspect.signature(command, eval_str=True)  # the Annotated hints typer reads, not their text
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    for option in (o for o in declared_options() if o.cli):
        flags = option.cli_flags
        if option.kind is bool and "/" not in flags[0]:
            flags = (f"{flags[0]}/--no-{flags[0][2:]}",)
        hint = Annotated[option.kind | None, Opt(*flags, help=_objective_help(option.name))]
        params.append(inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=hint))
    command.__signature__ = signature.replace(parameters=params)
    command.__annotations__ = {**command.__annotations__, **{p.name: p.annotation for p in params}}
    return command


def _objective_help(name: str) -> str:
    """The help of an objective option: each declaring objective's text and default."""
    from peftkit.train.objectives.base import get_objective, objective_names

    declared = [(n, o) for n in objective_names() for o in get_objective(n).options if o.name == name]
    texts = {o.help for _, o in declared}
    if len(texts) == 1:
        return f"{declared[0][1].help} --objective {', '.join(n for n, _ in declared)} (default {declared[0][1].default})."
    return " ".join(f"{n}: {o.help.rstrip('.')} (default {o.default})." for n, o in declared)


@app.command("train")
@_with_objective_flags
def train_cmd(
    config: Annotated[str | None, Opt("--config", "-c", help="YAML recipe; flags override its keys.")] = None,
    model: Model = None,
    method: Method = None,
    rank: Rank = None,
    alpha: Alpha = None,
    dropout: Dropout = None,
    target_modules: TargetModules = None,
    variant: Variant = None,
    reduction_factor: ReductionFactor = None,
    num_virtual_tokens: NumVirtualTokens = None,
    sets: Set = None,
    data: Annotated[list[str] | None, Opt("--data", "-d", help="json/jsonl/csv/parquet file, datasets folder or hub name; default: the bundled task. Several mix: repeat --data, or a.jsonl:0.7,b.jsonl:0.3 (weights: shares of the mixed rows).")] = None,
    format: Annotated[str | None, Opt("--format", help="auto | alpaca | messages | text | prompt_completion.")] = None,
    columns: Annotated[list[str] | None, Opt("--columns", help="Map the data's column names to peftkit's: instruction=question,output=answer (peftkit's name=the dataset's).")] = None,
    chat_template: Annotated[str | None, Opt("--chat-template", help="Chat template for a model without one (or to replace its own): chatml | llama3 | alpaca, or a Jinja file; saved with the result.")] = None,
    eval_data: Annotated[str | None, Opt("--eval-data", help="Held-out data file.")] = None,
    eval_split: Annotated[str | None, Opt("--eval-split", help="A split name of --data, or a share (0.05) / count of rows to hold out.")] = None,
    lr: Annotated[float | None, Opt("--lr", help="Peak learning rate.")] = None,
    epochs: Annotated[float | None, Opt("--epochs", help="Passes over the training data (fractions allowed).")] = None,
    max_steps: Annotated[int | None, Opt("--max-steps", help="Optimizer steps (overrides --epochs).")] = None,
    batch_size: Annotated[int | None, Opt("--batch-size", help="Examples per micro-batch per process.")] = None,
    grad_accum: Annotated[int | None, Opt("--grad-accum", help="Micro-batches per optimizer step.")] = None,
    max_length: Annotated[int | None, Opt("--max-length", help="Tokens per example (packed row).")] = None,
    packing: Annotated[bool | None, Opt("--packing/--no-packing", help="Pack examples into rows (padding-free).")] = None,
    gradient_checkpointing: Annotated[bool | None, Opt("--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations in the backward pass: less activation memory, slower steps.")] = None,
    precision: Annotated[str | None, Opt("--precision", help="auto (bf16 autocast where the GPU or CPU has fast bf16, else fp32) | fp32 | bf16 | fp16 | amp.")] = None,
    attention: Annotated[str | None, Opt("--attention", help="auto | eager | sdpa: the attention kernel (auto: the faster one for this device, precision and length).")] = None,
    compile: Annotated[bool | None, Opt("--compile/--no-compile", help="torch.compile each decoder layer (default: only runs long enough to win back the compile time).")] = None,
    share_prefix: Annotated[bool | None, Opt("--share-prefix/--no-share-prefix", help="Compute a prompt prefix that all rows of a micro-batch share (system prompt, instruction) once, not once per row (default: on where the model allows it).")] = None,
    batch_tokens: Annotated[int | None, Opt("--batch-tokens", help="Micro-batches of at most N padded tokens (rows x longest row) instead of --batch-size rows.")] = None,
    warmup: Annotated[float | None, Opt("--warmup", help="Warmup steps, or a fraction < 1 of the steps.")] = None,
    scheduler: Annotated[str | None, Opt("--scheduler", help="cosine | linear | constant.")] = None,
    loraplus_lr_ratio: Annotated[float | None, Opt("--loraplus-lr-ratio", help="LoRA+: LoRA's B matrices (and 1-D adapter parameters such as DoRA's magnitude) learn at R x --lr.")] = None,
    fsdp: Annotated[bool | None, Opt("--fsdp/--no-fsdp", help="Shard weights, gradients and optimizer states over the launcher's processes with FSDP2 (full shard).")] = None,
    deepspeed: Annotated[str | None, Opt("--deepspeed", help="Shard with DeepSpeed through accelerate: zero1 | zero2 | zero3 | a DeepSpeed JSON config (needs a GPU).")] = None,
    seed: Annotated[int | None, Opt("--seed", help="Set before the adapter is initialised.")] = None,
    train_on_prompt: Annotated[bool | None, Opt("--train-on-prompt/--no-train-on-prompt", help="Also train on the prompt tokens (default: the loss counts only the answers).")] = None,
    objective: Annotated[str | None, Opt("--objective", help="sft (default) | dpo | orpo | simpo (on {prompt, chosen, rejected} rows) | kto (on {prompt, completion, label} rows), or a plugin's.")] = None,
    output: Output = None,
    overwrite: Overwrite = False,
    save_steps: Annotated[int | None, Opt("--save-steps", help="Checkpoint every N steps.")] = None,
    eval_steps: Annotated[int | None, Opt("--eval-steps", help="Eval loss every N steps.")] = None,
    resume: Annotated[bool, Opt("--resume", help="Continue the run in --output from its last checkpoint.")] = False,
    report_to: Annotated[list[str] | None, Opt("--report-to", help="Experiment trackers: none | tensorboard | wandb | mlflow; several comma-separated or repeated (written to RUN/tracking/).")] = None,
    dry_run: Annotated[bool, Opt("--dry-run", help="Build everything, print counts and memory, train nothing.")] = False,
    quiet: Annotated[bool, Opt("--quiet", help="No progress bar.")] = False,
    print_config: Annotated[bool, Opt("--print-config", help="Print the fully resolved recipe (flags, recipe and defaults merged) as YAML and exit.")] = False,
    **objective_options: object,  # one flag per objective option (`_with_objective_flags`): --beta, ...
) -> None:
    """Fine-tune a model; with no options, LoRA on the embedded model and the bundled task."""
    flags = {k: v for k, v in locals().items()
             if k not in ("config", "sets", "quiet", "overwrite", "resume", "dry_run", "print_config",
                          "objective_options")}
    flags.update(objective_options)
    from peftkit.core.registry import get_method
    from peftkit.train.config import load_train_config, resolve_defaults
    from peftkit.train.run import train

    flags.update(set=parse_sets(sets) or None, overwrite=overwrite or None, resume=resume or None,
                 dry_run=dry_run or None, report_to=",".join(report_to) if report_to else None,
                 data=",".join(data) if data else None, columns=_columns(columns) or None)
    cfg = load_train_config(config, flags)
    if print_config:
        import yaml

        print(yaml.safe_dump(resolve_defaults(cfg).to_dict(), sort_keys=False), end="")
        return
    result = train(cfg, progress=not quiet)
    if result.run_dir is None or not result.main:
        return
    saved = result.saved
    whole_model = get_method(cfg.method).trains_base
    print(f"\nrun folder: {result.run_dir}  ({result.wall_s:.0f} s)")
    print(f"  {'model' if whole_model else 'adapter'}: {saved}")
    print(f"  config: {result.run_dir.config}\n  metrics: {result.run_dir.metrics}")
    print(f"  loss curve: {result.run_dir.curve}")
    flag = f"--model {shlex.quote(str(saved))}" if whole_model else f"--adapter {shlex.quote(str(saved))}"
    print(f"chat with it:\n  peftkit generate {flag} {_shell_quote(_example_prompt(result))}")


def _columns(values: list[str] | None) -> dict[str, str]:
    """{"instruction": "question", ...} from ["instruction=question,output=answer", ...]."""
    from peftkit.errors import PeftkitError

    out: dict[str, str] = {}
    for pair in (part for value in values or [] for part in value.split(",") if part.strip()):
        ours, sep, theirs = pair.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise PeftkitError(f"--columns expects peftkit_name=dataset_column pairs, e.g. instruction=question; "
                               f"got {pair!r}")
        out[ours.strip()] = theirs.strip()
    return out


def _example_prompt(result) -> str:
    """A prompt for the closing hint: the first eval sample's user message when there is one."""
    samples = (result.after or {}).get("samples") or []
    return samples[0]["prompt"] if samples else "Hello!"


def _shell_quote(text: str) -> str:
    """Quote for bash; newlines (alpaca prompts have a blank line) use $'...' so the prompt is exactly as trained."""
    if "\n" not in text:
        return shlex.quote(text)
    return "$'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"
