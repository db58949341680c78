"""Option declarations shared by several commands, so every command spells them the same way.

Use them as parameter annotations: `def train(rank: Rank = None, ...)`. `parse_sets` turns `--set key=value`
pairs into a dict (values stay text; `Method.field_options` parses them as YAML scalars).
"""

from __future__ import annotations

from typing import Annotated, Optional

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


# Shared by merge / combine / compress.
Base = Annotated[Optional[str], typer.Option("--base", "--model", "-m", help="Base model: folder or hub id; default: the embedded model.")]
Adapters = Annotated[Optional[list[str]], typer.Option("--adapter", "-a", help="LoRA adapter folder (repeat to combine several).")]
Weights = Annotated[Optional[str], typer.Option("--weights", help="Comma list, one weight per --adapter (default 1 each).")]
Combination = Annotated[str, typer.Option("--combination", help="How several adapters combine: concat (exact) | linear | svd (needs --rank).")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help="fp32 | bf16 | fp16 (default: keep the checkpoint's).")]
