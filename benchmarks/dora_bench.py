"""peftkit DoRA vs HF PEFT DoRA on the same random-init Llama (no network): training step, memory, unmerged generate.

    python benchmarks/dora_bench.py [--hidden 512 --layers 4 --rank 16 --batch 4 --seq 128 --repeats 7 --new 64]

Both tools get the same model (seeded, from a config), the same DoRA adapter (all linear layers, the same A, B and
magnitudes: PEFT's adapter is saved and loaded into peftkit) and the same inputs. Measured in one process,
interleaved (the order alternates each repeat), and reported as medians with ratios peftkit / PEFT:

- train step: forward + backward + AdamW step (train mode, dropout 0), seconds;
- saved activations: bytes of the tensors autograd holds for backward when a forward has returned (distinct
  storages, found with `torch.autograd.graph.saved_tensors_hooks`): the training memory that depends on the method;
- peak RSS: each tool's three training steps in a fresh child process: the peak RSS during the steps (VmHWM, reset
  before them through /proc/self/clear_refs; Linux) minus the RSS before them, MiB;
- generate: greedy `model.generate` of --new tokens (KV cache, eval, no_grad) unmerged; peftkit plain LoRA of the
  same rank is timed too, the cost DoRA inference should approach when its norms are cached.

CPU timings depend on the machine's load at the time: run it when the machine is quiet.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

import peftkit


def build_base(args: argparse.Namespace) -> torch.nn.Module:
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = None
    return model


def build(tool: str, args: argparse.Namespace, adapter: Path) -> torch.nn.Module:
    """`tool` in peft | peftkit | peftkit-lora, loaded with the saved adapter, trainable."""
    model = build_base(args)
    if tool == "peft":
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    if tool == "peftkit-lora":
        return peftkit.inject(model, peftkit.LoraConfig(r=args.rank, target_modules="all-linear"))
    return peftkit.load_adapter(model, adapter)


def save_adapter(args: argparse.Namespace, folder: Path) -> None:
    """PEFT's DoRA adapter with random (trained-like) A, B and magnitudes."""
    model = get_peft_model(build_base(args), PeftLoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                            target_modules="all-linear", use_dora=True))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=g)
                param.copy_(param * (1 + 0.1 * noise) if "magnitude" in name else 0.02 * noise)
    model.save_pretrained(folder)


def inputs(args: argparse.Namespace, length: int) -> torch.Tensor:
    return torch.randint(0, args.vocab, (args.batch, length), generator=torch.Generator().manual_seed(2))


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd still holds for backward when the forward has returned (tensors
    saved by a graph that was already freed, such as a detached temporary's, do not count)."""
    packed: list[tuple[weakref.ref, int, int]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        packed.append((weakref.ref(t), storage.data_ptr(), storage.nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    alive = {ptr: n for ref, ptr, n in packed if ref() is not None and ptr not in params}
    del loss
    return sum(alive.values())


def generate_time(model: torch.nn.Module, prompt: torch.Tensor, new: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                       do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def rss_child(tool: str, args: argparse.Namespace, adapter: Path) -> None:
    """In a child process: RSS growth (MiB) of three training steps after the model is built."""
    model = build(tool, args, adapter).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak (VmHWM) to the current RSS
    for _ in range(3):
        train_step(model, opt, inputs(args, args.seq))
    print(json.dumps({"mib": (_rss_kib("VmHWM") - before) / 1024}))


def _rss_kib(field: str) -> int:
    """A /proc/self/status memory field (VmRSS: now, VmHWM: peak since the last reset), KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_rss(tool: str, argv: list[str], adapter: Path) -> float:
    out = subprocess.run([sys.executable, __file__, *argv, "--rss-child", tool, "--adapter", str(adapter)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["mib"]


def report(name: str, unit: str, values: dict[str, list[float]]) -> None:
    med = {k: statistics.median(v) for k, v in values.items()}
    cells = "  ".join(f"{k} {m:.4g} {unit}" for k, m in med.items())
    line = f"{name:<18} {cells}  ratio peftkit/peft {_ratio(med['peftkit'], med['peft'])}"
    if "peftkit-lora" in med:
        line += f"  peftkit DoRA / peftkit LoRA {_ratio(med['peftkit'], med['peftkit-lora'])}"
    print(line)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rss-child", default=None)
    parser.add_argument("--adapter", default=None)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args, Path(args.adapter))
        return
    argv = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "dora"
        save_adapter(args, adapter)
        tools = ["peft", "peftkit"]
        models = {t: build(t, args, adapter) for t in tools}
        n_params = sum(p.numel() for p in models["peft"].parameters())
        print(f"torch threads {torch.get_num_threads()}; Llama hidden {args.hidden}, {args.layers} layers, "
              f"{n_params / 1e6:.1f} M parameters fp32; DoRA r={args.rank} on all linear layers; batch {args.batch} x "
              f"{args.seq} tokens; {args.repeats} repeats, interleaved; medians")
        ids = inputs(args, args.seq)
        with torch.no_grad():
            diff = (models["peft"].eval()(input_ids=ids).logits - models["peftkit"].eval()(input_ids=ids).logits)
        print(f"same function: max |logit difference| {diff.abs().max():.2e}")
        opts = {t: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for t, m in models.items()}
        steps: dict[str, list[float]] = {t: [] for t in tools}
        for t in tools:
            models[t].train()
            train_step(models[t], opts[t], ids)  # warm-up
        for i in range(args.repeats):
            for t in tools if i % 2 == 0 else tools[::-1]:
                steps[t].append(train_step(models[t], opts[t], ids))
        report("train step", "s", steps)
        report("saved activations", "MiB", {t: [saved_bytes(models[t], ids) / 2**20] for t in tools})
        report("peak RSS (3 steps)", "MiB", {t: [peak_rss(t, argv, adapter)] for t in tools})
        models["peftkit-lora"] = build("peftkit-lora", args, adapter)
        prompt = inputs(args, 16)[:1]
        gen: dict[str, list[float]] = {t: [] for t in models}
        order = list(models)
        for t in order:
            models[t].eval()
            generate_time(models[t], prompt, 4)  # warm-up
        for i in range(args.repeats):
            for t in order if i % 2 == 0 else order[::-1]:
                gen[t].append(generate_time(models[t], prompt, args.new))
        report(f"generate {args.new} tok", "s", gen)


if __name__ == "__main__":
    main()
