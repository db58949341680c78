"""Install llama.cpp's Python converters (convert_lora_to_gguf.py, convert_hf_to_gguf.py, their `conversion`
package and the matching gguf-py) into a cache folder, for the tests that run them on peftkit's outputs.

They come from a registry package that ships them: the source distribution of `llama_cpp_python` on PyPI vendors
llama.cpp. Only the sdist is downloaded (`pip download --no-binary`, no build) and only those files are extracted.
Idempotent: a folder that holds the pinned version is used as is.

    python .ci/llama_cpp_converters.py           # install if needed; print the folder
    python .ci/llama_cpp_converters.py --where   # print the folder if installed, else exit 1 (no network)

The folder is $PEFTKIT_LLAMA_CPP, else ~/.cache/peftkit/llama-cpp-converters. Run a converter with
PYTHONPATH=<folder>/gguf-py:<folder> so that it imports the gguf-py it was written with.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"  # llama_cpp_python, vendoring the llama.cpp whose converters the tests run
WANTED = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion/", "gguf-py/")
MARKER = "llama_cpp_python.version"


def folder() -> Path:
    return Path(os.environ.get("PEFTKIT_LLAMA_CPP") or Path.home() / ".cache/peftkit/llama-cpp-converters")


def installed(target: Path) -> bool:
    marker = target / MARKER
    return marker.is_file() and marker.read_text().strip() == VERSION


def install(target: Path) -> None:
    """Download the sdist, extract the converters beside `target`, then rename into place."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama_cpp_python=={VERSION}", "--no-deps",
                        "--no-binary", ":all:", "-q", "-d", tmp], check=True)
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
        staging = Path(tmp) / "out"
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                rel = member.name[len(prefix):] if member.name.startswith(prefix) else ""
                if member.isfile() and rel.startswith(WANTED) and (rel.endswith(".py") or "/" not in rel):
                    member.name = rel
                    tar.extract(member, staging, filter="data")
        (staging / MARKER).write_text(VERSION + "\n")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staging), target)


def main() -> int:
    target = folder()
    if not installed(target):
        if sys.argv[1:] == ["--where"]:
            return 1
        install(target)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
