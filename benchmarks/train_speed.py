"""How close peftkit's training step is to this machine's limit: tokens/s and model-FLOPs utilisation (MFU).

    python benchmarks/train_speed.py                      # every variant, 14 steps each, bundled task
    python benchmarks/train_speed.py --variants fp32,auto --steps 20 --repeats 3

One run measures, in this order and in one process (so the load on a shared machine is as alike as it can be):
1. the matmul peak, fp32 and bf16, on the embedded model's own linear shapes (its q/k/v/o, gate/up/down and LM head
   weights against a micro-batch of 8 x 128 rows), FLOP-weighted like a training step: FLOPs / seconds over the set;
2. peftkit's training step (LoRA r=8 on q_proj/v_proj of the embedded SmolLM2-135M, the bundled task, batch 8,
   max_length 128: the zero-argument run's settings) in each variant below, via `peftkit.train.run.train`; tokens/s
   from the run's own metrics.jsonl (cumulative `tokens` and `elapsed_s`), skipping the first --skip steps (warm-up,
   compilation);
3. HF PEFT + Trainer on the same rows in the same precision (fp32, and bf16=True for the bf16 variants), timed from
   its on_train_begin to the last on_step_end (first --skip steps skipped the same way).

MFU = tokens/s x 4 x (linear parameters incl. the LM head) / peak FLOP/s of the same precision (the usual count for
training through a frozen base: forward 2 FLOPs per weight, backward 2 for the input gradients; computing fewer
logits, or computing a prompt prefix the rows share once, as peftkit does, therefore counts as speed: the count is
every row's tokens, so with a shared prefix "MFU" is the nominal model's, above what the matmul units did). Printed per variant: median tokens/s over --repeats, MFU
against the bf16 and the fp32 peak, and the ratio to the HF run of the same precision.

Variants (peftkit): fp32; auto (what `--precision auto` picks here; on a bf16 CPU: amp, eager attention, fused
loss); amp-sdpa (amp with SDPA attention); amp-keep (amp without the fused loss: logits at kept positions);
compiled (auto + --compile; the first steps include compilation, hence --skip); b16 (auto, 16 rows per micro-batch);
unshared (auto with --no-share-prefix: every row computes the shared system prompt and instruction itself).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import _step_clock

VARIANTS = {
    "fp32": {"precision": "fp32"},
    "auto": {"precision": "auto"},
    "amp-sdpa": {"precision": "amp", "attention": "sdpa"},
    "amp-keep": {"precision": "amp", "loss_path": "keep"},
    "compiled": {"precision": "auto", "compile": True},
    "b16": {"precision": "auto", "batch_size": 16},
    "unshared": {"precision": "auto", "share_prefix": False},
}
SETTINGS = {"method": "lora", "rank": 8, "max_length": 128, "batch_size": 8, "lr": 2e-3, "eval_split": "0",
            "warmup": 0, "seed": 0}


def linear_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(out, in) of every nn.Linear in the model, the LM head included."""
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)]


def matmul_peak(shapes: list[tuple[int, int]], rows: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP/s of x[rows, in] @ W[in, out] over the distinct shapes, weighted by how often each occurs."""
    counts: dict[tuple[int, int], int] = {}
    for shape in shapes:
        counts[shape] = counts.get(shape, 0) + 1
    flops = seconds = 0.0
    for (out, inp), n in counts.items():
        x, w = torch.randn(rows, inp, dtype=dtype), torch.randn(inp, out, dtype=dtype)
        x @ w  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ w
            times.append(time.perf_counter() - start)
        flops += n * 2 * rows * inp * out
        seconds += n * statistics.median(times)
    return flops / seconds


def peftkit_tokens_per_s(variant: dict, steps: int, skip: int) -> tuple[float, str]:
    """(tokens/s after `skip` steps, the run's resolved precision) of one peftkit run of `steps` steps."""
    import peftkit.train.run as run_module
    from peftkit.train.config import load_train_config
    from peftkit.train.devices.precision import auto_precision
    from peftkit.train.run import train

    options = {**SETTINGS, **{k: v for k, v in variant.items() if k != "loss_path"}, "max_steps": steps}
    forced = variant.get("loss_path")
    original = run_module.loss_path
    if forced:
        run_module.loss_path = lambda model: forced
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = train(load_train_config(None, {**options, "output": f"{tmp}/run"}), progress=False)
            records = [json.loads(x) for x in result.run_dir.metrics.read_text().splitlines()]
    finally:
        run_module.loss_path = original
    del result
    train_records = [r for r in records if r["kind"] == "train"]
    first, last = train_records[skip - 1], train_records[-1]
    precision = auto_precision()[0] if variant["precision"] == "auto" else variant["precision"]
    return (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"]), precision


def hf_tokens_per_s(precision: str, steps: int, skip: int, batch_size: int) -> float:
    """HF PEFT + Trainer on the bundled rows (tokenized as peftkit does), same LoRA, same batch, same precision."""
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from peftkit import data
    from peftkit.data.prompting import default_prompt_format
    from peftkit.io.models import embedded_folder, load_model

    tokenizer = AutoTokenizer.from_pretrained(embedded_folder())
    ds = data.tokenize(data.load_rows(str(data.BUNDLED_TRAIN)), tokenizer, fmt="alpaca", max_length=128,
                       prompt_format=default_prompt_format(tokenizer))
    rows = [{"input_ids": i, "labels": lab} for i, lab in zip(ds["input_ids"], ds["labels"], strict=True)]
    rows = rows[: steps * batch_size]
    lengths = [len(r["input_ids"]) for r in rows]
    model, _ = load_model()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    clock = _step_clock()
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=batch_size, learning_rate=2e-3,
                                  max_steps=steps, report_to=[], logging_steps=10_000, save_strategy="no",
                                  use_cpu=True, seed=0, dataloader_num_workers=0, remove_unused_columns=False,
                                  bf16=precision == "amp", train_sampling_strategy="sequential")
        Trainer(model=model, args=targs, train_dataset=datasets.Dataset.from_list(rows),
                data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
                callbacks=[clock]).train()
    tokens = sum(lengths[skip * batch_size:])
    return tokens / (clock.ends[-1] - clock.ends[skip - 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"Comma list of: {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--skip", type=int, default=2, help="Steps not timed (warm-up; compilation)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-hf", action="store_true", help="Skip the HF PEFT + Trainer runs")
    args = parser.parse_args()
    from peftkit.io.models import load_model

    model, _ = load_model()
    shapes = linear_shapes(model)
    linear_params = sum(o * i for o, i in shapes)
    del model
    print(f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}; "
          f"{linear_params / 1e6:.1f}M linear parameters incl. the LM head -> {4 * linear_params / 1e6:.0f} MFLOP/token")
    peak = {"fp32": matmul_peak(shapes, 1024, torch.float32), "amp": matmul_peak(shapes, 1024, torch.bfloat16)}
    print(f"matmul peak on the model's shapes (1024 rows): fp32 {peak['fp32'] / 1e12:.3f} TFLOP/s, "
          f"bf16 {peak['amp'] / 1e12:.3f} TFLOP/s", flush=True)
    speeds: dict[str, list[float]] = {}
    precisions: dict[str, str] = {}
    hf: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name in args.variants.split(","):
            tps, precisions[name] = peftkit_tokens_per_s(VARIANTS[name], args.steps, args.skip)
            speeds.setdefault(name, []).append(tps)
            print(f"  {name}: {tps:.0f} tok/s ({precisions[name]}), load {os.getloadavg()[0]:.2f}", flush=True)
        for precision in [] if args.no_hf else sorted(set(precisions.values())):
            hf.setdefault(precision, []).append(hf_tokens_per_s(precision, args.steps, args.skip, 8))
            print(f"  hf-{precision}: {hf[precision][-1]:.0f} tok/s, load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"\n{'variant':10} {'precision':>9} {'tok/s':>8} {'MFU bf16':>9} {'MFU fp32':>9} {'vs HF':>7}")
    for name, values in [*speeds.items(), *((f"hf-{p}", v) for p, v in hf.items())]:
        precision = precisions.get(name, name[3:])
        tps = statistics.median(values)
        flops = 4 * linear_params * tps
        versus = f"{tps / statistics.median(hf[precision]):.2f}x" if precision in hf and name in speeds else ""
        fp32_mfu = f"{flops / peak['fp32']:9.1%}" if precision == "fp32" else f"{'-':>9}"  # amp vs fp32 peak: moot
        print(f"{name:10} {precision:>9} {tps:8.0f} {flops / peak['amp']:9.1%} {fp32_mfu} {versus:>7}")


if __name__ == "__main__":
    main()
