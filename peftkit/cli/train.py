"""`peftkit train`: fine-tune a model with any registered method (or full / freeze) on accelerate.

    peftkit train --method lora --rank 8                    # embedded SmolLM2-135M on the bundled task
    peftkit train --config recipes/lora.yaml --lr 1e-4      # a recipe; flags override its keys
    torchrun --nproc_per_node 2 cli.py train ...            # the same command on several processes

Flags left unset do not override the recipe; every flag is also a recipe key (dashes become underscores). The
flags are generated from the options' declarations (`TrainConfig`'s fields, peftkit/core/method_options.py).
Precedence: flag > --set > recipe > default; a value given twice is a warning naming the one ignored.
"""

from __future__ import annotations

import inspect
import shlex
from typing import Annotated, Any

import typer

from peftkit.cli._app import app
from peftkit.cli._declared import given, signature
from peftkit.cli._options import Set, parse_sets
from peftkit.core.options import Option
from peftkit.train.config import extra_options, train_options

Opt = typer.Option


def _own(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


# The command's own parameters; every other one is generated from the options' declarations (TrainConfig's fields,
# the shared method options, and `train.config.EXTRA_OPTIONS`).
BEFORE = [_own("config", Annotated[str | None, Opt("--config", "-c", help="YAML recipe; flags and --set override its keys.")], None)]
AFTER = [
    _own("sets", Set, None),
    _own("quiet", Annotated[bool, Opt("--quiet", help="No progress bar.")], False),
    _own("print_config", Annotated[bool, Opt("--print-config", help="Print the fully resolved recipe (flags, --set, recipe and defaults merged) as YAML, each key with where its value came from, and exit.")], False),
]


def command_options() -> list[Option]:
    """The options `peftkit train` has flags for: TrainConfig's and the extra declared ones."""
    return [*train_options().values(), *(option for _, option in extra_options().values())]


def train_cmd(**values: Any) -> None:
    """Fine-tune a model; with no options, LoRA on the embedded model and the bundled task."""
    from peftkit.core.registry import get_method
    from peftkit.train.config import load_sourced, print_config
    from peftkit.train.run import train

    flags = {**given(command_options(), values), "set": parse_sets(values.get("sets")) or None}
    cfg, sources = load_sourced(values.get("config"), flags)
    if values.get("print_config"):
        print(print_config(cfg, sources), end="")
        return
    result = train(cfg, progress=not values.get("quiet"))
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


train_cmd.__signature__ = signature(command_options(), BEFORE, AFTER)  # type: ignore[attr-defined]
app.command("train")(train_cmd)


def _example_prompt(result) -> str:
    """A prompt for the closing hint: the first eval sample's user message when there is one."""
    samples = (result.after or {}).get("samples") or []
    return samples[0]["prompt"] if samples else "Hello!"


def _shell_quote(text: str) -> str:
    """Quote for bash; newlines (alpaca prompts have a blank line) use $'...' so the prompt is exactly as trained."""
    if "\n" not in text:
        return shlex.quote(text)
    return "$'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"
