"""`peftkit inspect [MODEL]`: architecture facts and what each method would train on it.

Only the config is read; counts come from injecting each method into a meta-device copy of the model, so they are
exactly what `train` would create and cost no memory.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

from peftkit.cli._app import app
from peftkit.cli._options import Json, Rank, TargetModules
from peftkit.errors import PeftkitError

if TYPE_CHECKING:  # `peftkit --help` imports this module: no torch or transformers at run time
    from torch import nn

def _settings(rank: int, target_modules: str | None) -> list[tuple[str, dict]]:
    """(method, options) per row: the methods whose config takes a rank and targets first, with the given targets and
    with all-linear, then every other registered method with its defaults."""
    import dataclasses

    from peftkit.core.registry import get_method, method_names

    def ranked(name: str) -> bool:
        return {"r", "target_modules"} <= {f.name for f in dataclasses.fields(get_method(name).config_cls)}

    settings = [(name, {"r": rank, "target_modules": targets}) for name in method_names() if ranked(name)
                for targets in (target_modules, "all-linear")]
    return settings + [(name, {}) for name in method_names() if not ranked(name)]


def _rows(model_config, rank: int, target_modules: str | None) -> list[dict]:
    """One row per method setting: name, options, trainable parameters, share of the total."""
    from peftkit.core.counting import count_parameters

    settings = _settings(rank, target_modules)
    rows: list[dict[str, Any]] = []
    for method, options in settings:
        options = {k: v for k, v in options.items() if v is not None}
        try:
            trainable, total = count_parameters(model_config, method, **options)
        except PeftkitError as exc:
            rows.append({"method": method, "options": options, "error": str(exc)})
            continue
        rows.append({"method": method, "options": options, "trainable": trainable, "total": total})
    return rows


@app.command("inspect")
def inspect_cmd(
    model: Annotated[str | None, typer.Argument(help="Hub id, folder, .gguf; default: the embedded model.")] = None,
    rank: Rank = 8,
    target_modules: TargetModules = None,
    as_json: Json = False,
) -> None:
    """Show the architecture, default targets and trainable-parameter counts per method."""
    from rich.console import Console
    from rich.table import Table

    from peftkit.core.archs import ARCHS, arch_spec, model_dims
    from peftkit.core.counting import meta_model
    from peftkit.io.models import load_model_config

    config = load_model_config(model)
    meta = meta_model(config)
    spec = arch_spec(meta)
    dims = model_dims(config)
    info = {
        "model": model or "smollm2-135m (embedded)",
        "model_type": config.model_type,
        "known_architecture": config.model_type in ARCHS,
        "layers": len(cast("nn.ModuleList", meta.get_submodule(spec.layers))) if spec.layers else None,
        "hidden_size": dims["hidden"],
        "attention_heads": dims["heads"],
        "kv_heads": dims["kv_heads"],
        "vocab_size": config.vocab_size,
        "parameters": sum(p.numel() for p in meta.parameters()),
        "default_lora_targets": list(spec.lora_targets),
        "methods": _rows(config, rank, target_modules),
    }
    if as_json:
        print(json.dumps(info, indent=2))
        return
    console = Console()
    for key in ("model", "model_type", "layers", "hidden_size", "attention_heads", "kv_heads", "vocab_size"):
        console.print(f"{key:>20}: {info[key]}")
    console.print(f"{'parameters':>20}: {info['parameters']:,}")
    console.print(f"{'default LoRA targets':>20}: {', '.join(info['default_lora_targets'])}")
    table = Table("method", "options", "trainable", "% of total")
    for row in info["methods"]:
        opts = ", ".join(f"{k}={v}" for k, v in row["options"].items()) or "defaults"
        if "error" in row:
            table.add_row(row["method"], opts, "-", row["error"])
        else:
            table.add_row(row["method"], opts, f"{row['trainable']:,}", f"{100 * row['trainable'] / row['total']:.3f}")
    console.print(table)
