"""Streaming merge vs HF PEFT (load + merge_and_unload + save_pretrained): peak RSS and wall time.

    python benchmarks/merge_bench.py [--hidden 1024 --layers 24 --shard 300MB --workdir /tmp/merge_bench]

Builds a random-init Llama (~0.47 B parameters at the defaults, bf16, several shards) and a rank-16 all-linear
LoRA adapter with random A and B, then runs each side once in its own subprocess (so imports and allocator state
do not leak between them). Peak RSS is the subprocess's ru_maxrss (it includes the file pages it mapped). Both
outputs are compared tensor by tensor at the end. Results depend on machine load: say what else was running.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

RSS = "import resource; print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
PEFT_SIDE = """
import torch, sys
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3], max_shard_size=sys.argv[4])
"""
OURS_SIDE = "import sys; from peftkit.cli import main\nmain(['merge', '--base', sys.argv[1], '-a', sys.argv[2], '-o', sys.argv[3]])\n"


def build(work: Path, hidden: int, layers: int, shard: str) -> tuple[Path, Path]:
    """Random-init Llama checkpoint (bf16, sharded) and a rank-16 all-linear adapter, cached in `work`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    base, adapter = work / "base", work / "adapter"
    if not (base / "config.json").is_file():
        config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                             num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=False)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(base, max_shard_size=shard)
        del model
    if not (adapter / "adapter_config.json").is_file():
        adapter.mkdir(parents=True, exist_ok=True)
        tensors, g = {}, torch.Generator().manual_seed(1)
        names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
        for shard_file in sorted(set(index.values())):
            with safe_open(str(base / shard_file), framework="pt") as f:
                names_in_file = f.keys()  # a safe_open handle is not iterable itself
                for key in names_in_file:
                    module = key.removesuffix(".weight")
                    if module.rsplit(".", 1)[-1] in names:
                        out_f, in_f = f.get_slice(key).get_shape()
                        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(16, in_f, generator=g) / in_f**0.5
                        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, 16, generator=g) * 0.01
        save_file(tensors, str(adapter / "adapter_model.safetensors"))
        (adapter / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 16, "lora_alpha": 32, "target_modules": list(names),
            "base_model_name_or_path": str(base), "lora_dropout": 0.0, "bias": "none"}))
    return base, adapter


def run(code: str, *args: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of `code` run in a fresh interpreter."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code + "\n" + RSS, *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    kb = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KB")))
    return wall, kb * 1024 / 1e9


def compare(a: Path, b: Path) -> float:
    """Largest absolute difference between two checkpoints, tensor by tensor (fp32)."""
    worst = 0.0
    index_a = json.loads((a / "model.safetensors.index.json").read_text())["weight_map"]
    index_b = json.loads((b / "model.safetensors.index.json").read_text())["weight_map"]
    for key, shard in index_a.items():
        with safe_open(str(a / shard), framework="pt") as fa, safe_open(str(b / index_b[key]), framework="pt") as fb:
            worst = max(worst, float((fa.get_tensor(key).float() - fb.get_tensor(key).float()).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--shard", default="300MB")
    parser.add_argument("--workdir", default="/tmp/merge_bench")
    args = parser.parse_args()
    work = Path(args.workdir)
    base, adapter = build(work, args.hidden, args.layers, args.shard)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
    results = {}
    for name, code in (("peft", PEFT_SIDE), ("peftkit", OURS_SIDE)):
        out = work / f"out-{name}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        extra = [args.shard] if name == "peft" else []
        results[name] = run(code, str(base), str(adapter), str(out), *extra)
    (pw, pr), (ow, orss) = results["peft"], results["peftkit"]
    print(f"checkpoint {size:.2f} GB (10^9 bytes, bf16, {len(list(base.glob('*.safetensors')))} shards), rank-16 all-linear LoRA")
    print(f"{'':8} {'wall s':>8} {'peak RSS GB':>12}")
    print(f"{'PEFT':8} {pw:8.1f} {pr:12.2f}")
    print(f"{'peftkit':8} {ow:8.1f} {orss:12.2f}")
    print(f"ratio peftkit/PEFT: wall {ow / pw:.2f}x (target <= 1.0), peak RSS {orss / pr:.2f}x (target <= 0.5)")
    print(f"max |difference| between the two merged checkpoints: {compare(work / 'out-peft', work / 'out-peftkit'):.3e}")


if __name__ == "__main__":
    main()
