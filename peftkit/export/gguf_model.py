"""A whole model folder (a merge, a full fine-tune) -> one GGUF file, through llama.cpp's convert_hf_to_gguf.py.

The `gguf` package writes GGUF files but does not convert models: the vocabulary (tokenizer -> GGUF tokens, scores,
merges, the pre-tokenizer's identity) and each architecture's hyper-parameters and tensor rewrites live in
llama.cpp's converter, not in the package. So peftkit runs that converter when it is available (a llama.cpp
checkout, or the folder `python .ci/llama_cpp_converters.py` fills from the llama_cpp_python sdist), with its own
gguf-py first on PYTHONPATH, and says how to get it when it is not.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.export.gguf_adapter import check_file_output, temporary_file

CONVERTER = "convert_hf_to_gguf.py"
ENV = "PEFTKIT_LLAMA_CPP"
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "auto")


def find_converter(llama_cpp: str | os.PathLike | None) -> Path:
    """llama.cpp's folder holding convert_hf_to_gguf.py: `llama_cpp`, else $PEFTKIT_LLAMA_CPP."""
    where = llama_cpp or os.environ.get(ENV)
    if not where:
        raise PeftkitError(
            f"writing a whole model as GGUF needs llama.cpp's {CONVERTER} (the gguf package has no model converter); "
            f"give --llama-cpp DIR (a llama.cpp checkout) or set {ENV}; `python .ci/llama_cpp_converters.py` "
            "installs the converters from the llama_cpp_python source distribution and prints their folder")
    folder = Path(where).expanduser()
    if not (folder / CONVERTER).is_file():
        raise PeftkitError(f"{str(folder)!r} has no {CONVERTER}; give the llama.cpp folder that holds it")
    return folder


def export_gguf_model(model: str | os.PathLike, output: str | os.PathLike, *, llama_cpp: str | os.PathLike | None = None,
                      outtype: str = "f16", overwrite: bool = False) -> Path:
    """Convert the HF model folder `model` to the GGUF file `output` with llama.cpp's converter."""
    if outtype not in OUTTYPES:
        raise PeftkitError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise PeftkitError(f"{str(model)!r} is not a model folder (no config.json)")
    target = check_file_output(output, overwrite, inputs=[folder])
    converter = find_converter(llama_cpp)
    paths = [str(converter / "gguf-py"), str(converter)] if (converter / "gguf-py").is_dir() else [str(converter)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1"}
    tmp = temporary_file(target)
    try:
        run = subprocess.run([sys.executable, str(converter / CONVERTER), "--outfile", str(tmp), "--outtype", outtype,
                              str(folder)], env=env, capture_output=True, text=True)
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise PeftkitError(f"llama.cpp's {CONVERTER} failed on {str(model)!r}: {last}")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
