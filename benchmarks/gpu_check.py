"""GPU check: measured peak memory vs `peftkit estimate`, and tokens/s vs HF PEFT + Trainer, on a 7B-shaped model.

    python benchmarks/gpu_check.py                       # on a GPU machine (no internet needed)
    python benchmarks/gpu_check.py --dry-run             # anywhere: the plan and the estimates, no GPU work

The model is random-initialised from an estimator preset's exact config (default qwen1.5-7b: the shapes, hence
the memory and the speed, of the released model; the values do not matter for either), saved once as a bf16
safetensors folder with the embedded model's tokenizer, so both sides load the same files. Sides, each in its own
fresh process (so torch.cuda.max_memory_allocated is its own):

  peftkit-lora   `peftkit.train.run.train`: LoRA r=16 on every linear projection, --precision amp (bf16 base,
                 fp32 adapters, bf16 autocast), AdamW
  hf-lora        HF PEFT (the same LoraConfig) + transformers Trainer, bf16=True, the same optimizer settings
  peftkit-qlora  the same over an NF4 base (only if peftkit's trainer has a `qlora` method and bitsandbytes imports)
  hf-qlora       PEFT + Trainer over BitsAndBytesConfig(load_in_4bit, nf4, double quant, bf16 compute)

Both sides train on identical fixed-length blocks of random token ids (batch x seq-len, packed: no padding),
--steps optimizer steps; tokens/s counts the steps after --warmup. Each row prints the measured peak
(max_memory_allocated, GB = 1e9 bytes), `peftkit estimate`'s total for the same setup and their ratio, and
tokens/s with the ratio peftkit / HF measured in the same run. Record results in docs/memory.md and
docs/training.md with the GPU name.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SIDES = ("peftkit-lora", "hf-lora", "peftkit-qlora", "hf-qlora")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR, SEED = 1e-4, 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen1.5-7b", help="an estimator preset (peftkit estimate --list)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of tokens/s")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {', '.join(SIDES)}")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the estimates; no GPU work")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--side", help=argparse.SUPPRESS)    # child process: run one side
    parser.add_argument("--folder", help=argparse.SUPPRESS)  # child process: the saved random model
    args = parser.parse_args(argv)
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [s for s in args.sides if s not in SIDES]
    if unknown:
        parser.error(f"unknown side(s) {unknown}; choose from {', '.join(SIDES)}")
    if args.warmup >= args.steps:
        parser.error("--warmup must be smaller than --steps")
    return args


def qlora_available() -> tuple[bool, str]:
    """(usable, why not): peftkit's trainer knows `qlora` and bitsandbytes imports."""
    if not bitsandbytes_imports():
        return False, "bitsandbytes does not import"
    from peftkit.core.registry import method_names

    return ("qlora" in method_names(), "peftkit's trainer has no qlora method yet")


def bitsandbytes_imports() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def estimate(args: argparse.Namespace, side: str) -> Any:
    """`peftkit estimate` of the side's setup (one GPU, the same batch, length, rank and targets)."""
    from peftkit.memory import estimate_memory

    method = "qlora" if side.endswith("qlora") else "lora"
    extra = {"bits": 4} if method == "qlora" else {}
    return estimate_memory(args.preset, method, precision="amp", batch_size=args.batch_size, seq_len=args.seq_len,
                           gradient_checkpointing=args.gradient_checkpointing, r=args.rank,
                           target_modules=",".join(TARGETS), **extra)


def plan(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """(side, reason it is skipped or None)."""
    ok, why = qlora_available()
    skip = {"peftkit-qlora": None if ok else why,
            "hf-qlora": None if bitsandbytes_imports() else "bitsandbytes does not import"}
    return [(side, skip.get(side)) for side in args.sides]


# ------------------------------------------------------------------------------------------- child sides

def _blocks(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(SEED)
    n = args.steps * args.batch_size
    return torch.randint(10, vocab, (n, args.seq_len), generator=g).tolist()


def run_peftkit(args: argparse.Namespace, vocab: int, qlora: bool) -> dict:
    """peftkit's trainer on the blocks decoded to text (format text, packed into rows of --seq-len tokens); the
    tokens it counts per step are its own (metrics.jsonl)."""
    from transformers import AutoTokenizer

    from peftkit.train.config import TrainConfig
    from peftkit.train.run import train

    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    with tempfile.TemporaryDirectory() as tmp:
        rows = Path(tmp) / "rows.jsonl"
        rows.write_text("".join(json.dumps({"text": tokenizer.decode(b)}) + "\n" for b in _blocks(args, vocab) * 2))
        cfg = TrainConfig(model=args.folder, method="qlora" if qlora else "lora", rank=args.rank, alpha=2 * args.rank,
                          dropout=0.0, target_modules=",".join(TARGETS), data=str(rows), format="text",
                          eval_split="0", lr=LR, max_steps=args.steps, batch_size=args.batch_size,
                          max_length=args.seq_len, packing=True, warmup=0, precision="amp",
                          gradient_checkpointing=args.gradient_checkpointing, seed=SEED, output=f"{tmp}/run")
        result = train(cfg, progress=False)
        records = [json.loads(x) for x in result.run_dir.metrics.read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    return {"ends": [r["elapsed_s"] for r in train_records], "tokens": [r["step_tokens"] for r in train_records]}


def run_hf(args: argparse.Namespace, vocab: int, qlora: bool) -> dict:
    """HF PEFT + Trainer on the same blocks."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainerCallback, TrainingArguments

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16) if qlora else None
    model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.bfloat16, device_map={"": 0},
                                                 quantization_config=quant)
    if qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    blocks = _blocks(args, vocab)
    data = datasets.Dataset.from_list([{"input_ids": b, "labels": b} for b in blocks])
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *_a: Any, **_k: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *_a: Any, **_k: Any) -> None:
            torch.cuda.synchronize()
            ends.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=args.batch_size, learning_rate=LR,
                                  max_steps=args.steps, lr_scheduler_type="cosine", warmup_steps=0, bf16=True,
                                  gradient_checkpointing=args.gradient_checkpointing, report_to=[], seed=SEED,
                                  logging_steps=10_000, save_strategy="no", remove_unused_columns=False)
        Trainer(model=model, args=targs, train_dataset=data, callbacks=[Clock()]).train()
    return {"ends": ends, "tokens": [args.batch_size * args.seq_len] * len(ends)}


def child(args: argparse.Namespace) -> None:
    """Run one side in this (fresh) process and print its JSON line."""
    import torch
    from transformers import AutoConfig

    vocab = min(AutoConfig.from_pretrained(args.folder).vocab_size, len(_embedded_tokenizer()))
    torch.cuda.reset_peak_memory_stats()
    run = run_peftkit if args.side.startswith("peftkit") else run_hf
    out = run(args, vocab, args.side.endswith("qlora"))
    ends = out["ends"]
    timed = ends[-1] - ends[args.warmup - 1] if args.warmup else ends[-1]
    tokens = sum(out["tokens"][args.warmup:])
    print(json.dumps({"side": args.side, "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
                      "reserved_gb": torch.cuda.max_memory_reserved() / 1e9, "tokens_per_s": tokens / timed,
                      "steps": len(ends)}))


# ------------------------------------------------------------------------------------------- parent

def save_random_model(preset: str, folder: Path) -> None:
    """A bf16 random-init model of the preset's exact config, with the embedded model's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from peftkit.memory.presets import resolve_config

    config, _ = resolve_config(preset)
    torch.manual_seed(SEED)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    _embedded_tokenizer().save_pretrained(folder)
    del model
    torch.cuda.empty_cache()


def _embedded_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from peftkit.io.models import embedded_folder

    return AutoTokenizer.from_pretrained(embedded_folder())


def table(rows: list[dict]) -> str:
    """The results as a Markdown table, with peftkit / HF tokens/s ratios."""
    speed = {r["side"]: r.get("tokens_per_s") for r in rows}
    lines = ["| side | measured peak GB | estimate GB | measured / estimate | tokens/s | peftkit / HF |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['side']} | skipped: {r['skipped']} | {r['estimate_gb']:.2f} | | | |")
            continue
        if "peak_gb" not in r:
            lines.append(f"| {r['side']} | (not measured) | {r['estimate_gb']:.2f} | | | |")
            continue
        other = speed.get(r["side"].replace("peftkit", "hf")) if r["side"].startswith("peftkit") else None
        ratio = f"{r['tokens_per_s'] / other:.2f}" if other else ""
        lines.append(f"| {r['side']} | {r['peak_gb']:.2f} | {r['estimate_gb']:.2f} | "
                     f"{r['peak_gb'] / r['estimate_gb']:.2f} | {r['tokens_per_s']:.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.side:
        child(args)
        return
    rows = []
    for side, skipped in plan(args):
        est = estimate(args, side)
        rows.append({"side": side, "estimate_gb": est.total_bytes / 1e9, "skipped": skipped,
                     "estimate_breakdown_gb": {k: round(v / 1e9, 3) for k, v in est.breakdown.items()}})
    print(f"{args.preset}: batch {args.batch_size} x {args.seq_len} tokens, LoRA r={args.rank} on {', '.join(TARGETS)}, "
          f"{'checkpointing, ' if args.gradient_checkpointing else ''}{args.steps} steps ({args.warmup} warmup)")
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU here; run with --dry-run for the plan and the estimates")
        print(f"GPU: {torch.cuda.get_device_name(0)}")
        with tempfile.TemporaryDirectory() as tmp:
            save_random_model(args.preset, Path(tmp))
            for row in rows:
                if not row["skipped"]:
                    row.update(_run_side(args, row["side"], tmp))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


def _run_side(args: argparse.Namespace, side: str, folder: str) -> dict:
    """One side in a fresh process; its JSON line, or the error's last lines."""
    cmd = [sys.executable, __file__, "--side", side, "--folder", folder, "--preset", args.preset, "--seq-len",
           str(args.seq_len), "--batch-size", str(args.batch_size), "--rank", str(args.rank), "--steps",
           str(args.steps), "--warmup", str(args.warmup),
           "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode or not lines:
        print(f"{side} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return {"skipped": f"failed (exit {proc.returncode})"}
    return json.loads(lines[-1])


if __name__ == "__main__":
    main()
