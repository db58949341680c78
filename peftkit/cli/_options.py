"""Option declarations shared by several commands, so every command spells them the same way.

Use them as parameter annotations: `def estimate(rank: Rank = None, ...)` (the shared method options are
generated from their declarations; `peftkit train` generates all of its flags). `parse_sets` turns `--set
key=value` pairs into a dict (values stay text; `Method.field_options` types them as the config's fields).
`print_json` is every command's `--json` printer.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

import typer

from peftkit.cli._declared import annotated
from peftkit.core.method_options import ALPHA, NUM_VIRTUAL_TOKENS, RANK, REDUCTION_FACTOR, TARGET_MODULES, VARIANT
from peftkit.errors import PeftkitError

Model = Annotated[str | None, typer.Option("--model", "-m", help="Hub id, model folder, .gguf file; default: embedded SmolLM2-135M-Instruct.")]
Adapter = Annotated[str | None, typer.Option("--adapter", "-a", help="Saved adapter folder.")]
DequantizedBase = Annotated[bool, typer.Option("--dequantized-base", help="A QLoRA adapter: load its base unquantized (default: quantized as its peftkit.json records, as it was trained).")]
Output = Annotated[str | None, typer.Option("--output", "-o", "--out", help="Output folder.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")]
# The shared method options, from their one declaration (peftkit/core/method_options.py).
Rank = annotated(RANK)
Alpha = annotated(ALPHA)
TargetModules = annotated(TARGET_MODULES)
Variant = annotated(VARIANT)
ReductionFactor = annotated(REDUCTION_FACTOR)
NumVirtualTokens = annotated(NUM_VIRTUAL_TOKENS)
Set = Annotated[list[str] | None, typer.Option("--set", help="Any other method config field: --set key=value (repeatable; a field behind an option above, e.g. r for --rank, is that option).")]
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
Base = Annotated[str | None, typer.Option("--base", "--model", "-m", help="Base model: folder or hub id; default: the embedded model.")]
Adapters = Annotated[list[str] | None, typer.Option("--adapter", "-a", help="LoRA adapter folder (repeat to combine several).")]
Weights = Annotated[str | None, typer.Option("--weights", help="Comma list, one weight per --adapter (default 1 each).")]
Combination = Annotated[str, typer.Option("--combination", help="How several adapters combine: concat (exact) | linear | svd (needs --rank).")]
Dtype = Annotated[str | None, typer.Option("--dtype", help="fp32 | bf16 | fp16 (default: keep the checkpoint's).")]


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float (NaN, ±inf) replaced by None, through dicts, lists and tuples."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def print_json(value: Any) -> None:
    """The one `--json` printer: strict JSON (RFC 8259 has no NaN or Infinity; a non-finite number prints as null)."""
    print(json.dumps(strict_json(value), indent=2, allow_nan=False))


# Shared by generate / chat.
System = Annotated[str | None, typer.Option("--system", help="System message (chat models).")]
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Most tokens generated per answer.")]
Temperature = Annotated[float, typer.Option("--temperature", min=0.0, max=1e6, help="Sampling temperature; 0 = greedy.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed of the sampling (with --temperature > 0).")]
