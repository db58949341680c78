"""Option declarations shared by several commands, so every command spells them the same way.

Use them as parameter annotations: `def train(rank: Rank = None, ...)`. `method_options()` turns the method flags
and `--set key=value` pairs into the dict that `Method.build_config` takes.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from peftkit.errors import PeftkitError

Model = Annotated[Optional[str], typer.Option("--model", "-m", help="Hub id, model folder, .gguf file; default: embedded SmolLM2-135M-Instruct.")]
Adapter = Annotated[Optional[str], typer.Option("--adapter", "-a", help="Saved adapter folder.")]
Output = Annotated[Optional[str], typer.Option("--output", "-o", "--out", help="Output folder.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")]
Method = Annotated[str, typer.Option("--method", help="lora | adapter | prefix | prompt (train also: full, freeze).")]
Rank = Annotated[Optional[int], typer.Option("--rank", "-r", help="LoRA rank (the config's r).")]
Alpha = Annotated[Optional[float], typer.Option("--alpha", help="LoRA alpha (default 2 x rank).")]
Dropout = Annotated[Optional[float], typer.Option("--dropout", help="Adapter dropout in [0, 1).")]
TargetModules = Annotated[Optional[str], typer.Option("--target-modules", help="Comma list of module names, a regex, or all-linear.")]
Variant = Annotated[Optional[str], typer.Option("--variant", help="Bottleneck adapter variant: houlsby | pfeiffer | parallel.")]
ReductionFactor = Annotated[Optional[int], typer.Option("--reduction-factor", help="Bottleneck size = hidden / reduction factor.")]
NumVirtualTokens = Annotated[Optional[int], typer.Option("--num-virtual-tokens", help="Prefix / prompt length.")]
Set = Annotated[Optional[list[str]], typer.Option("--set", help="Any other method config field: --set key=value (repeatable).")]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def parse_sets(pairs: list[str] | None) -> dict[str, str]:
    """{"key": "value"} from ["key=value", ...]; a pair without "=" is an error."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise PeftkitError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def method_options(
    rank: int | None = None,
    alpha: float | None = None,
    dropout: float | None = None,
    target_modules: str | None = None,
    variant: str | None = None,
    reduction_factor: int | None = None,
    num_virtual_tokens: int | None = None,
    sets: list[str] | None = None,
) -> dict[str, Any]:
    """The options given on the command line (unset ones left out), for `Method.build_config`."""
    given = {
        "rank": rank,
        "alpha": alpha,
        "dropout": dropout,
        "target_modules": target_modules,
        "variant": variant,
        "reduction_factor": reduction_factor,
        "num_virtual_tokens": num_virtual_tokens,
    }
    options = {k: v for k, v in given.items() if v is not None}
    options.update(parse_sets(sets))
    return options

# Shared by merge / combine / compress.
Base = Annotated[Optional[str], typer.Option("--base", "--model", "-m", help="Base model: folder or hub id; default: the embedded model.")]
Adapters = Annotated[Optional[list[str]], typer.Option("--adapter", "-a", help="LoRA adapter folder (repeat to combine several).")]
Weights = Annotated[Optional[str], typer.Option("--weights", help="Comma list, one weight per --adapter (default 1 each).")]
Combination = Annotated[str, typer.Option("--combination", help="How several adapters combine: concat (exact) | linear | svd (needs --rank).")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help="fp32 | bf16 | fp16 (default: keep the checkpoint's).")]
