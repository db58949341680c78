"""What llama.cpp does with a GGUF LoRA adapter, recomputed in the tests from the file itself, and how to run its
Python converters (installed by `.ci/llama_cpp_converters.py`; the tests using them skip when they are absent)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def converters_folder() -> Path:
    """The installed converters' folder, or skip (CI installs them first: .ci/run)."""
    run = subprocess.run([sys.executable, str(ROOT / ".ci/llama_cpp_converters.py"), "--where"],
                         capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip("llama.cpp's converters are not installed; run `python .ci/llama_cpp_converters.py` (CI does)")
    return Path(run.stdout.strip())


def run_converter(folder: Path, script: str, *args: object) -> None:
    """Run one of llama.cpp's converters with its own gguf-py, offline; fail with its stderr."""
    env = {**os.environ, "PYTHONPATH": f"{folder / 'gguf-py'}{os.pathsep}{folder}", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(folder / script), *map(str, args)], env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0, f"{script} failed:\n{run.stderr[-3000:]}"


def gguf_deltas(path: Path) -> dict[str, torch.Tensor]:
    """{gguf weight name: ΔW} as llama.cpp applies the adapter: scale = adapter.lora.alpha / rank, with rank the
    tensor's own (lora_b's ne[0]), times lora_b @ lora_a."""
    import gguf

    reader = gguf.GGUFReader(path)
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    tensors = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)) for t in reader.tensors}
    out = {}
    for name, a in tensors.items():
        if name.endswith(".lora_a"):
            b = tensors[name[:-1] + "b"]
            out[name[: -len(".lora_a")]] = alpha / b.shape[1] * (b @ a)
    return out


def peft_deltas(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """{module path: ΔW} as HF PEFT applies the adapter (its own get_delta_weight)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    prefix = "base_model.model."
    return {name[len(prefix):]: module.get_delta_weight("default").detach()
            for name, module in model.named_modules() if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {})}


def as_gguf(deltas: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """PEFT's deltas under llama.cpp's names and row order (q / k rows permuted for Llama)."""
    import gguf

    from peftkit.export.gguf_adapter import ARCHITECTURES, permute_rows

    arch, permute = ARCHITECTURES[config["model_type"]]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch], config["num_hidden_layers"])
    out = {}
    for module, delta in deltas.items():
        if permute and module.endswith(("q_proj", "k_proj")):
            key = "num_attention_heads" if module.endswith("q_proj") else "num_key_value_heads"
            delta = permute_rows(delta, config[key])
        out[names.get_name(f"{module}.weight", try_suffixes=(".weight",))] = delta
    return out


def relative_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    assert set(got) == set(want), set(got) ^ set(want)
    return {k: float((got[k] - want[k]).norm() / want[k].norm()) for k in want}
