"""`peftkit export`: an adapter or a model folder -> a file another runtime loads (today: llama.cpp's GGUF)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from peftkit.cli._app import app
from peftkit.cli._options import Json, Overwrite, print_json
from peftkit.errors import PeftkitError

FORMATS = ("gguf",)


@app.command("export")
def export_cmd(
    source: Annotated[str, typer.Argument(help="A LoRA adapter folder, or a model folder (e.g. a merge's output).")],
    output: Annotated[str | None, typer.Option("--output", "-o", "--out", help="The file to write (NAME.gguf).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="Output format: gguf (llama.cpp).")] = "gguf",
    base: Annotated[str | None, typer.Option("--base", help="Adapters: the base model folder or hub id (for its architecture); default: the adapter's base_model_name_or_path.")] = None,
    llama_cpp: Annotated[str | None, typer.Option("--llama-cpp", help="Models: the llama.cpp folder holding convert_hf_to_gguf.py (default $PEFTKIT_LLAMA_CPP).")] = None,
    outtype: Annotated[str, typer.Option("--outtype", help="Models: f32 | f16 | bf16 | q8_0 | auto (adapters are written in f32).")] = "f16",
    overwrite: Overwrite = False,
    as_json: Json = False,
) -> None:
    """Export a LoRA adapter as a llama.cpp adapter (GGUF, with the same per-module deltas PEFT applies), or a
    model folder as a GGUF model (through llama.cpp's converter)."""
    if fmt not in FORMATS:
        raise PeftkitError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not output:
        raise PeftkitError("give --output FILE.gguf")
    folder = Path(source)
    if (folder / "adapter_config.json").is_file():
        from peftkit.export.gguf_adapter import export_gguf_adapter

        written, kind = export_gguf_adapter(folder, output, base=base, overwrite=overwrite), "llama.cpp LoRA adapter"
    elif (folder / "config.json").is_file():
        from peftkit.export.gguf_model import export_gguf_model

        written = export_gguf_model(folder, output, llama_cpp=llama_cpp, outtype=outtype, overwrite=overwrite)
        kind = "GGUF model (llama.cpp's convert_hf_to_gguf.py)"
    else:
        raise PeftkitError(f"{source!r} is neither an adapter folder (adapter_config.json) nor a model folder "
                           "(config.json)")
    size = written.stat().st_size
    if as_json:
        print_json({"output": str(written), "format": fmt, "kind": kind, "bytes": size})
        return
    print(f"wrote {kind} {written} ({size / 1e6:.2f} MB, 10^6 bytes)")
