"""The training configuration: one dataclass whose fields declare every training option, filled from defaults,
then a YAML recipe, then `--set`, then command-line flags.

    cfg = load_train_config(recipe="recipes/lora.yaml", overrides={"lr": 1e-4})   # flags override the file
    cfg = resolve_defaults(cfg)                                                   # then the defaults that depend on it

Every key of a recipe is a field of `TrainConfig` (the same names as the CLI flags, with `_` for `-`) or another
tool's name for one (the field's `Option.aliases`), and `set` is a mapping of extra method-config fields (`--set
key=value`). An unknown key is an error listing the valid ones, so a typo in a recipe never silently trains with a
default. Precedence (sources.py): flag > `--set` > recipe > default; a value given twice is a warning naming the
one ignored. No torch here: `peftkit train --help` builds its flags from these declarations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from peftkit.core.method_options import (
    ALPHA,
    DROPOUT,
    INIT,
    NUM_VIRTUAL_TOKENS,
    RANK,
    REDUCTION_FACTOR,
    SHARED,
    TARGET_MODULES,
    TARGET_PARAMETERS,
    VARIANT,
)
from peftkit.core.options import Option, declare, declared_options, option
from peftkit.core.registry import get_method
from peftkit.errors import PeftkitError
from peftkit.train.objectives.base import declared_options as objective_options
from peftkit.train.objectives.base import get_objective, resolve_options
from peftkit.train.options.recipe_keys import read_recipe_file
from peftkit.train.options.sources import Given, gather, render_yaml
from peftkit.train.reporting.tracking import parse_report_to

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "amp")
SCHEDULERS = ("cosine", "linear", "constant")
FORMATS = ("auto", "alpaca", "messages", "text", "prompt_completion")
ATTENTIONS = ("auto", "eager", "sdpa")  # train/devices/speed.py says when auto picks which
BIG = 1 << 40
# The zero-argument run's, measured in peftkit/data/README.md (q,v LoRA r=8: 86% exact match after 30 steps).
BUNDLED_DEFAULTS = {"lr": 2e-3, "max_steps": 30, "batch_size": 8, "max_length": 128}
GENERIC_DEFAULTS = {"batch_size": 4, "max_length": 512}
# Options declared elsewhere, stored in a dict field of TrainConfig: field -> the provider of its Options (the
# objectives' options: train/objectives/). Recipes, flags and --print-config take them like the fields' own, flat
# (`beta: 0.2`); a value lands in `values[field][option.target]`.
EXTRA_OPTIONS: dict[str, Callable[[], Iterable[Option]]] = {"objective_options": objective_options}

DATA_HELP = ("json/jsonl/csv/parquet file, datasets folder or hub name; default: the bundled task. Several mix: "
             "repeat --data, or a.jsonl:0.7,b.jsonl:0.3 (weights: shares of the mixed rows).")
LORAPLUS_HELP = ("LoRA+: LoRA's B matrices (and 1-D adapter parameters such as DoRA's magnitude) learn at R x --lr.")
PRECISION_HELP = "auto (bf16 autocast where the GPU or CPU has fast bf16, else fp32) | fp32 | bf16 | fp16 | amp."
SHARE_PREFIX_HELP = ("Compute a prompt prefix that all rows of a micro-batch share (system prompt, instruction) "
                     "once, not once per row (default: on where the model allows it).")


@dataclass
class TrainConfig:
    """Everything one training run needs. `None` means "the default for this model / data" (resolved later).

    Each field is declared once, as an `Option` (`option(...)` here, `declare(...)` for the options methods share,
    core/method_options.py): the `peftkit train` flags, recipe keys and other tools' names for them, `--set`,
    `--print-config` and docs/options.md are generated from these declarations.

    Optimisation: AdamW(lr, weight_decay) with `warmup` steps (an int, or a float < 1 = fraction of the steps)
    then a cosine / linear / constant schedule; gradients clipped to `max_grad_norm`. One optimizer step sees
    `batch_size * grad_accum * world_size` examples (batch_size is per process).
    """

    # what to train
    model: str | None = option(None, flags=("--model", "-m"), aliases=("model_name_or_path", "base_model"), help="Hub id, model folder, .gguf file; default: embedded SmolLM2-135M-Instruct.")
    method: str = option("lora", aliases=("finetuning_type", "adapter"), help="A registered method: lora | qlora | adapter | prefix | prompt | full | freeze, or a plugin's (`peftkit inspect` lists them).")
    rank: int | None = declare(RANK)
    alpha: float | None = declare(ALPHA)
    dropout: float | None = declare(DROPOUT)
    target_modules: str | list | None = declare(TARGET_MODULES)
    target_parameters: str | list | None = declare(TARGET_PARAMETERS)
    init: str | None = declare(INIT)
    variant: str | None = declare(VARIANT)
    reduction_factor: int | None = declare(REDUCTION_FACTOR)
    num_virtual_tokens: int | None = declare(NUM_VIRTUAL_TOKENS)
    set: dict[str, Any] = option(default_factory=dict, cli=False, help="Any other method config field (--set key=value, repeatable).")
    # data
    data: str | None = option(None, flags=("--data", "-d"), multiple=True, help=DATA_HELP)
    format: str = option("auto", choices=FORMATS, help="auto | alpaca | messages | text | prompt_completion.")
    eval_data: str | None = option(None, help="Held-out data file.")
    eval_split: str | float | None = option(None, kind=(int, float, str), aliases=("val_set_size",), help="A split name of --data, or a share (0.05) / count of rows to hold out.")
    eval_examples: int = option(50, low=0, high=1 << 31, cli=False, help="Most held-out rows split off the training data (5% of them).")
    max_length: int | None = option(None, low=2, high=1 << 24, aliases=("max_seq_length", "cutoff_len", "sequence_len"), help="Tokens per example (packed row).")
    packing: bool = option(False, aliases=("sample_packing",), help="Pack examples into rows (padding-free).")
    train_on_prompt: bool = option(False, aliases=("train_on_inputs",), help="Also train on the prompt tokens (default: the loss counts only the answers).")
    # optimisation
    lr: float | None = option(None, low=0, low_open=True, high=10, aliases=("learning_rate",), help="Peak learning rate.")
    epochs: float = option(1.0, low=0, low_open=True, high=1e6, aliases=("num_train_epochs", "num_epochs"), help="Passes over the training data (fractions allowed).")
    max_steps: int | None = option(None, low=1, high=BIG, help="Optimizer steps (overrides --epochs).")
    batch_size: int | None = option(None, low=1, high=1 << 20, aliases=("per_device_train_batch_size", "micro_batch_size"), help="Examples per micro-batch per process.")
    grad_accum: int = option(1, low=1, high=1 << 20, aliases=("gradient_accumulation_steps",), help="Micro-batches per optimizer step.")
    warmup: float = option(0.1, low=0, high=BIG, aliases=("warmup_steps", "warmup_ratio"), help="Warmup steps, or a fraction < 1 of the steps.")
    scheduler: str = option("cosine", choices=SCHEDULERS, aliases=("lr_scheduler_type", "lr_scheduler"), help="cosine | linear | constant.")
    weight_decay: float = option(0.0, low=0, high=10, cli=False, help="AdamW's weight decay.")
    max_grad_norm: float = option(1.0, low=0, high=1e9, cli=False, help="Gradients are clipped to this norm.")
    loraplus_lr_ratio: float | None = option(None, low=0, low_open=True, high=1e6, help=LORAPLUS_HELP)
    precision: str = option("auto", choices=PRECISIONS, help=PRECISION_HELP)
    gradient_checkpointing: bool = option(False, help="Recompute activations in the backward pass: less activation memory, slower steps.")
    attention: str = option("auto", choices=ATTENTIONS, help="auto | eager | sdpa: the attention kernel (auto: the faster one for this device, precision and length).")
    compile: bool | None = option(None, help="torch.compile each decoder layer (default: only runs long enough to win back the compile time).")
    batch_tokens: int | None = option(None, low=2, high=1 << 30, help="Micro-batches of at most N padded tokens (rows x longest row) instead of --batch-size rows.")
    share_prefix: bool = option(True, help=SHARE_PREFIX_HELP)
    seed: int = option(0, low=0, high=2**32 - 1, help="Set before the adapter is initialised.")
    # objective (train/objectives/): sft, dpo, orpo, simpo, kto or a plugin's; its options' values (`beta`, ...),
    # given flat in recipes and flags (EXTRA_OPTIONS), checked by the objective's declarations
    objective: str = option("sft", aliases=("pref_loss",), help="sft (default) | dpo | orpo | simpo (on {prompt, chosen, rejected} rows) | kto (on {prompt, completion, label} rows), or a plugin's.")
    objective_options: dict[str, Any] = option(default_factory=dict, cli=False, help="The objective's options (given flat: beta, ...).")
    # sharding over the processes of a launcher (peftkit/train/devices/sharding.py)
    fsdp: bool = option(False, help="Shard weights, gradients and optimizer states over the launcher's processes with FSDP2 (full shard).")
    deepspeed: str | None = option(None, help="Shard with DeepSpeed through accelerate: zero1 | zero2 | zero3 | a DeepSpeed JSON config (on a CPU: several torchrun processes).")
    # run folder
    output: str | None = option(None, flags=("--output", "-o", "--out"), aliases=("output_dir",), help="Output folder.")
    overwrite: bool = option(False, flags=("--overwrite",), aliases=("overwrite_output_dir",), help="Replace an existing output folder.")
    resume: bool = option(False, flags=("--resume",), help="Continue the run in --output from its last checkpoint.")
    save_steps: int | None = option(None, low=1, high=BIG, help="Checkpoint every N steps.")
    eval_steps: int | None = option(None, low=1, high=BIG, help="Eval loss every N steps.")
    eval_before: bool = option(True, help="Also score the held-out set before training (the baseline the run is compared with); --no-eval-before skips that pass.")
    keep_checkpoints: int = option(2, low=1, high=1 << 20, cli=False, help="Checkpoints kept in the run folder.")
    dry_run: bool = option(False, flags=("--dry-run",), help="Build everything, print counts and memory, train nothing.")
    # experiment trackers (tracking.py): "none" or a comma-separated list of tensorboard, wandb, mlflow
    report_to: str = option("none", multiple=True, help="Experiment trackers: none | tensorboard | wandb | mlflow; several comma-separated or repeated (written to RUN/tracking/).")
    # data mapping and prompts (peftkit/data/mixing.py, chat_templates.py); `data` may also be a mixture
    # ("a.jsonl:0.7,b.jsonl:0.3"; a recipe list of paths / {path, weight} is kept in that form)
    columns: dict[str, str] = option(default_factory=dict, multiple=True, help="Map the data's column names to peftkit's: instruction=question,output=answer (peftkit's name=the dataset's).")
    chat_template: str | None = option(None, help="Chat template for a model without one (or to replace its own): chatml | llama3 | alpaca, or a Jinja file; saved with the result.")

    def __post_init__(self) -> None:
        from peftkit.data.mixing import mixture_text
        from peftkit.io.deepspeed import deepspeed_stage

        self.data = mixture_text(self.data)  # a recipe's list of sources -> "a.jsonl:0.7,b.jsonl:0.3" (validated)
        for name, declared in train_options().items():  # types, bounds and choices of every field
            setattr(self, name, declared.check(getattr(self, name), required=declared.default is not None))
        self._canonical_set()
        if self.fsdp and self.deepspeed:
            raise PeftkitError("--fsdp and --deepspeed are two ways to shard; pick one")
        deepspeed_stage(self.deepspeed)  # zero1 | zero2 | zero3 | a readable JSON config with a valid stage
        if self.overwrite and self.resume:
            raise PeftkitError("--overwrite and --resume contradict each other; pick one")
        if isinstance(self.eval_split, float) and not (0 < self.eval_split < 1 or self.eval_split.is_integer()):
            raise PeftkitError(f"eval_split must be a split name, a share in (0, 1) or a whole number of rows, got "
                               f"{self.eval_split!r}")
        parse_report_to(self.report_to)  # unknown tracker names: now, not after the model is loaded
        get_method(self.method).build_config(self.method_options())  # unknown method or bad options: now, not later
        objective = get_objective(self.objective)  # an unknown objective lists the registered ones
        self.objective_options = {k: v for k, v in resolve_options(objective, self.objective_options).items()
                                  if k in self.objective_options}  # checked and coerced; defaults come later
        objective.check(self, get_method(self.method))

    def _canonical_set(self) -> None:
        """`set` keys behind a shared option (`r` behind `rank`) move to that option (refused when both are given
        and differ); the others are typed as the method config's fields."""
        method = get_method(self.method)
        kept = {}
        for key, value in self.set.items():
            name = method.canonical_key(str(key))
            if name not in SHARED:
                kept[name] = value
                continue
            value = SHARED[name].check(value)
            if getattr(self, name) not in (None, value):
                raise PeftkitError(f"{name} is given twice ({name}={getattr(self, name)!r} and set {key}={value!r}); "
                                   "keep one")
            setattr(self, name, value)
        self.set = method.field_options(kept)

    def method_options(self) -> dict[str, Any]:
        """The method's options (shared names + `set` fields), unset ones left out, for `Method.build_config`."""
        options = {k: getattr(self, k) for k in SHARED if getattr(self, k) is not None}
        options.update(self.set)
        return options

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML / JSON friendly), in field order, the objective's options flat after `objective` (as a
        recipe gives them, so a saved run_config.yaml loads again)."""
        out: dict[str, Any] = {}
        for key, value in dataclasses.asdict(self).items():
            if key == "objective_options":
                out.update(value)
            else:
                out[key] = value
        return out


@cache
def train_options() -> dict[str, Option]:
    """name -> Option of every TrainConfig field (the trainer's own options and the shared method options)."""
    return declared_options(TrainConfig)


def extra_options() -> dict[str, tuple[str, Option]]:
    """name -> (the dict field holding it, Option) for the options of `EXTRA_OPTIONS`."""
    return {o.name: (field, o) for field, provider in EXTRA_OPTIONS.items() for o in provider()}


def valid_keys() -> list[str]:
    """The keys a recipe may use."""
    return [f.name for f in dataclasses.fields(TrainConfig)] + list(extra_options())


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML recipe, keyed by peftkit's names (see `read_recipe_keys`)."""
    return {name: value for name, (_, value) in read_recipe_keys(path).items()}


def read_recipe_keys(path: str | Path) -> dict[str, tuple[str, Any]]:
    """name -> (the key as written, value) of a YAML recipe; LLaMA-Factory / axolotl / TRL key names (the options'
    aliases) are read as peftkit's, an unknown key is an error suggesting the closest valid one."""
    return read_recipe_file(path, [*train_options().values(), *(o for _, o in extra_options().values())])


def load_train_config(recipe: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """TrainConfig from defaults <- recipe file <- `--set` (overrides["set"]) <- flags (the other overrides; `None`
    values mean "not given")."""
    return load_sourced(recipe, overrides)[0]


def load_sourced(recipe: str | Path | None = None,
                 overrides: dict[str, Any] | None = None) -> tuple[TrainConfig, dict[str, Given]]:
    """`load_train_config` and where each given value came from (name -> Given; defaults are absent)."""
    overrides = dict(overrides or {})
    for key in overrides:
        if key not in valid_keys():
            raise PeftkitError(f"unknown option {key!r}; valid: {', '.join(valid_keys())}")
    recipe_keys = read_recipe_keys(recipe) if recipe else {}
    values, given = gather(recipe_keys, overrides, f"recipe {Path(recipe).name}" if recipe else "",
                           {**train_options(), **{n: o for n, (_, o) in extra_options().items()}}, set(SHARED))
    for name, (field, declared) in extra_options().items():
        if name in values:  # the field checked first: a recipe's `objective_options: false` beside `beta: 0`
            options = train_options()[field].check(values.get(field, {}))
            values[field] = {**options, declared.target: declared.check(values.pop(name))}
    try:
        return TrainConfig(**values), given
    except TypeError as exc:
        raise PeftkitError(f"invalid training options: {exc}") from None


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with `--config`)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def print_config(cfg: TrainConfig, given: dict[str, Given]) -> str:
    """The resolved config as YAML (a loadable recipe) with a comment per key saying where its value came from:
    `rank: 8  # flag --rank (also --set r=4, ignored)`, `lr: 0.002  # default (bundled task)`."""
    resolved, reasons = default_fill(cfg)
    notes = {name: reasons.get(name, "default") for name in resolved.to_dict()}
    notes.update({name: g.describe() for name, g in given.items() if name in notes})
    return render_yaml(resolved.to_dict(), notes)


def resolve_defaults(cfg: TrainConfig) -> TrainConfig:
    """Fill the `None` fields: bundled-task defaults when no --data, else generic ones; lr per method
    (`Method.default_lr`: whole-model fine-tunes need a far smaller one than adapters; on the bundled task an
    adapter's `Method.bundled_lr` where the method has one)."""
    return default_fill(cfg)[0]


def default_fill(cfg: TrainConfig) -> tuple[TrainConfig, dict[str, str]]:
    """`resolve_defaults(cfg)` and, for each field it filled, why ("default (bundled task)", ...)."""
    base = BUNDLED_DEFAULTS if cfg.data is None else GENERIC_DEFAULTS
    why = "default (bundled task)" if cfg.data is None else "default (your data)"
    fill: dict[str, tuple[Any, str]] = {k: (v, why) for k, v in base.items() if getattr(cfg, k) is None}
    if cfg.data is None and cfg.max_steps is None and cfg.epochs != 1.0:
        fill.pop("max_steps", None)  # an explicit --epochs wins over the bundled step count
    method = get_method(cfg.method)
    if cfg.lr is None and (cfg.data is not None or method.trains_base):
        fill["lr"] = (method.default_lr, f"default (method {method.name})")
    elif cfg.lr is None and method.bundled_lr is not None:
        fill["lr"] = (method.bundled_lr, f"default (bundled task, method {method.name})")
    objective = get_objective(cfg.objective)
    fill.update({k: (v, f"default (objective {cfg.objective})") for k, v in objective.defaults(cfg).items()})
    unset = {k: v for k, v in objective.option_defaults().items() if k not in cfg.objective_options}
    fill["objective_options"] = ({**cfg.objective_options, **unset}, "")
    resolved = dataclasses.replace(cfg, **{k: v for k, (v, _) in fill.items()})
    reasons = {k: why for k, (_, why) in fill.items() if k != "objective_options"}
    reasons.update(dict.fromkeys(unset, f"default (objective {cfg.objective})"))
    rows = objective.rows_per_example  # a preference pair is two rows (chosen, rejected)
    assert resolved.max_length is not None, "both default tables fill max_length"
    if resolved.batch_tokens is not None and resolved.batch_tokens < rows * resolved.max_length:
        what = "max_length" if rows == 1 else f"{rows} x max_length (an example of {cfg.objective} is {rows} rows)"
        raise PeftkitError(f"batch_tokens ({resolved.batch_tokens}) must be at least {what} "
                           f"({rows * resolved.max_length}) so that the longest example fits in a micro-batch")
    return resolved, reasons
