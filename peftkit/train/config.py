"""The training configuration: one dataclass, filled from defaults, then a YAML recipe, then command-line flags.

    cfg = load_train_config(recipe="recipes/lora.yaml", overrides={"lr": 1e-4})   # flags override the file
    cfg = resolve_defaults(cfg)                                                   # then the defaults that depend on it

Every key of a recipe is a field of `TrainConfig` (the same names as the CLI flags, with `_` for `-`), except
`set`, a mapping of extra method-config fields (`--set key=value`). An unknown key is an error listing the valid
ones, so a typo in a recipe never silently trains with a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peftkit.core.registry import get_method
from peftkit.errors import PeftkitError
from peftkit.io.deepspeed import deepspeed_stage
from peftkit.train.objectives import check_objective, objective_defaults
from peftkit.train.recipe_keys import translate
from peftkit.train.schema import coerce_fields
from peftkit.train.tracking import parse_report_to

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "amp")
SCHEDULERS = ("cosine", "linear", "constant")
FORMATS = ("auto", "alpaca", "messages", "text", "prompt_completion")
ATTENTIONS = ("auto", "eager", "sdpa")  # train/speed.py says when auto picks which
# From the measurements in peftkit/data/README.md (q,v LoRA r=8, lr 2e-3, batch 8: 86% exact match after 30
# steps; the longest example is 122 tokens): the zero-argument run uses these.
BUNDLED_DEFAULTS = {"lr": 2e-3, "max_steps": 30, "batch_size": 8, "max_length": 128}
GENERIC_DEFAULTS = {"batch_size": 4, "max_length": 512}
METHOD_OPTION_KEYS = ("rank", "alpha", "dropout", "target_modules", "variant", "reduction_factor", "num_virtual_tokens")


@dataclass
class TrainConfig:
    """Everything one training run needs. `None` means "the default for this model / data" (resolved later).

    Optimisation: AdamW(lr, weight_decay) with `warmup` steps (an int, or a float < 1 = fraction of the steps)
    then a cosine / linear / constant schedule; gradients clipped to `max_grad_norm`. One optimizer step sees
    `batch_size * grad_accum * world_size` examples (batch_size is per process).
    """

    # what to train
    model: str | None = None
    method: str = "lora"
    rank: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    target_modules: str | None = None
    variant: str | None = None
    reduction_factor: int | None = None
    num_virtual_tokens: int | None = None
    set: dict[str, Any] = field(default_factory=dict)
    # data
    data: str | None = None
    format: str = "auto"
    eval_data: str | None = None
    eval_split: str | float | None = None
    eval_examples: int = 50
    max_length: int | None = None
    packing: bool = False
    train_on_prompt: bool = False
    # optimisation
    lr: float | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int | None = None
    grad_accum: int = 1
    warmup: float = 0.1
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    loraplus_lr_ratio: float | None = None  # LoRA+: LoRA's B (and 1-D adapter parameters) learn at ratio x lr
    precision: str = "auto"
    gradient_checkpointing: bool = False
    attention: str = "auto"                # auto | eager | sdpa (train/speed.py)
    compile: bool | None = None            # torch.compile each decoder layer; None: when the run is long enough
    batch_tokens: int | None = None        # micro-batches by padded-token budget instead of batch_size rows
    share_prefix: bool = True              # a prompt prefix all rows of a micro-batch share is computed once
    seed: int = 0
    # objective (objectives.py): sft, or a preference objective on {prompt, chosen, rejected} rows
    objective: str = "sft"
    beta: float | None = None
    simpo_gamma: float | None = None
    precompute_ref: bool = False
    # sharding over the processes of a launcher (peftkit/train/sharding.py)
    fsdp: bool = False
    deepspeed: str | None = None
    # run folder
    output: str | None = None
    overwrite: bool = False
    resume: bool = False
    save_steps: int | None = None
    eval_steps: int | None = None
    keep_checkpoints: int = 2
    dry_run: bool = False
    # experiment trackers (tracking.py): "none" or a comma-separated list of tensorboard, wandb, mlflow
    report_to: str = "none"
    # data mapping and prompts (peftkit/data/mixing.py, chat_templates.py); `data` may also be a mixture
    # ("a.jsonl:0.7,b.jsonl:0.3"; a recipe list of paths / {path, weight} is kept in that form)
    columns: dict[str, str] = field(default_factory=dict)   # peftkit's column name -> the dataset's
    chat_template: str | None = None                         # a shipped template name or a Jinja file

    def __post_init__(self) -> None:
        from peftkit.data.mixing import mixture_text

        self.data = mixture_text(self.data)  # a recipe's list of sources -> "a.jsonl:0.7,b.jsonl:0.3" (validated)
        coerce_fields(self)  # types and bounds of every field (schema.py)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("scheduler", self.scheduler, SCHEDULERS)
        _check_choice("format", self.format, FORMATS)
        if self.fsdp and self.deepspeed:
            raise PeftkitError("--fsdp and --deepspeed are two ways to shard; pick one")
        deepspeed_stage(self.deepspeed)  # zero1 | zero2 | zero3 | a readable JSON config with a valid stage
        _check_choice("attention", self.attention, ATTENTIONS)
        if self.overwrite and self.resume:
            raise PeftkitError("--overwrite and --resume contradict each other; pick one")
        if isinstance(self.eval_split, float) and not (0 < self.eval_split < 1 or self.eval_split.is_integer()):
            raise PeftkitError(f"eval_split must be a split name, a share in (0, 1) or a whole number of rows, got "
                               f"{self.eval_split!r}")
        parse_report_to(self.report_to)  # unknown tracker names: now, not after the model is loaded
        get_method(self.method).build_config(self.method_options())  # unknown method or bad options: now, not later
        check_objective(self, get_method(self.method).trains_base)

    def method_options(self) -> dict[str, Any]:
        """The method's options (shared names + `set` fields), unset ones left out, for `Method.build_config`."""
        options = {k: getattr(self, k) for k in METHOD_OPTION_KEYS if getattr(self, k) is not None}
        options.update(self.set)
        return options

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML / JSON friendly), in field order."""
        return dataclasses.asdict(self)


def valid_keys() -> list[str]:
    """The keys a recipe may use."""
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PeftkitError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML recipe; LLaMA-Factory / axolotl / TRL key names are read as peftkit's
    (`recipe_keys.py`), an unknown key is an error suggesting the closest valid one."""
    file = Path(path)
    if not file.is_file():
        raise PeftkitError(f"recipe {str(file)!r} does not exist")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PeftkitError(f"recipe {file} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise PeftkitError(f"recipe {file} must be a mapping of option: value")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    return translate(data, valid_keys(), f"recipe {file}")


def load_train_config(recipe: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """TrainConfig from defaults <- recipe file <- overrides (flags; `None` values mean "not given")."""
    values: dict[str, Any] = read_recipe(recipe) if recipe else {}
    for key, value in (overrides or {}).items():
        if key not in valid_keys():
            raise PeftkitError(f"unknown option {key!r}; valid: {', '.join(valid_keys())}")
        if value is None:
            continue
        if key == "set" and isinstance(value, dict) and isinstance(values.get("set", {}), dict):
            values["set"] = {**values.get("set", {}), **value}  # flags add to the recipe's fields
        else:
            values[key] = value
    try:
        return TrainConfig(**values)
    except TypeError as exc:
        raise PeftkitError(f"invalid training options: {exc}") from None


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with `--config`)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def resolve_defaults(cfg: TrainConfig) -> TrainConfig:
    """Fill the `None` fields: bundled-task defaults when no --data, else generic ones; lr per method
    (`Method.default_lr`: whole-model fine-tunes need a far smaller one than adapters)."""
    base = BUNDLED_DEFAULTS if cfg.data is None else GENERIC_DEFAULTS
    fill = {k: v for k, v in base.items() if getattr(cfg, k) is None}
    if cfg.data is None and cfg.max_steps is None and cfg.epochs != 1.0:
        fill.pop("max_steps", None)  # an explicit --epochs wins over the bundled step count
    method = get_method(cfg.method)
    if cfg.lr is None and (cfg.data is not None or method.trains_base):
        fill["lr"] = method.default_lr
    fill.update(objective_defaults(cfg))
    resolved = dataclasses.replace(cfg, **fill)
    rows = 1 if resolved.objective == "sft" else 2  # a preference pair is two rows (chosen, rejected)
    if resolved.batch_tokens is not None and resolved.batch_tokens < rows * resolved.max_length:
        what = "max_length" if rows == 1 else "2 x max_length (a preference pair is two rows)"
        raise PeftkitError(f"batch_tokens ({resolved.batch_tokens}) must be at least {what} "
                           f"({rows * resolved.max_length}) so that the longest example fits in a micro-batch")
    return resolved
