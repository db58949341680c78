"""Training throughput: peftkit vs HF PEFT + transformers Trainer on the embedded SmolLM2-135M-Instruct.

    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py --repeats 3

Both sides train LoRA r=8 (alpha 16, q_proj/v_proj, no dropout) with AdamW, lr 2e-4, cosine, no warmup, grad-norm
clip 1.0, one epoch over the same examples, tokenized once by peftkit.data (identical input_ids and labels), on
the CPU in the same precision: --precision fp32 (default), or amp (bf16 autocast: peftkit's `--precision amp`, the
Trainer's `bf16=True`; peftkit also stores the frozen base in bf16, the Trainer keeps it in fp32). Defaults: 100 examples, batch 4, max_length 512 (peftkit's defaults for user data) = 25 optimizer steps.
Each side runs in its own fresh process so peak RSS (ru_maxrss) is its own. Reported per side (medians over
--repeats, with the min-max spread): useful tokens/s (the examples' own, non-padding tokens / training time),
training time (first step start to last step end, measured the same way on both sides: peftkit's `fit` clock,
the Trainer's on_train_begin .. last on_step_end), peak RSS, the share of computed positions that are padding, and
the largest micro-batch in positions (activation memory, hence peak RSS, follows it). Ratios are the medians of
the per-repeat ratios (each repeat runs every side once, one after the other), with their min-max.

Data (--data):
  variable  (default) a deterministic variable-length instruction set built from the bundled rows (no network):
            most examples combine k bundled sentences into one numbered instruction answered by k key=value lines,
            k long-tailed (Pareto, at most 7); a quarter ask for one field of one sentence. ~55 to ~480 tokens.
  bundled   the first N rows of the bundled task as they are (all ~90-120 tokens).

Sides:
  peftkit       `peftkit.train.run.train` (length-grouped batches, loss only at target positions)
  peftkit-pack  the same with --packing (padding-free rows, position ids restart per example); not in the default
  hf-padded     PEFT + Trainer + DataCollatorForSeq2Seq (padded batches; Trainer defaults: random order)
  hf-grouped    the same with train_sampling_strategy="group_by_length" (HF's own length grouping); not default
  hf-flatten    PEFT + Trainer + DataCollatorWithFlattening (HF's padding-free collator)
  fixed-peftkit / fixed-hf  the same pre-built padded batch tensors (peftkit's length-grouped plan, padded by
                DataCollatorForSeq2Seq) through a plain loop on each side: model + injection + loss cost only
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_SIDES = ("peftkit", "hf-padded", "hf-flatten", "fixed-peftkit", "fixed-hf")
SIDES = (*DEFAULT_SIDES, "peftkit-pack", "hf-grouped")
PAIRS = [("peftkit", "hf-padded"), ("peftkit", "hf-grouped"), ("peftkit", "hf-flatten"), ("peftkit-pack", "hf-padded"),
         ("peftkit-pack", "hf-flatten"), ("fixed-peftkit", "fixed-hf")]
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
LR = 2e-4
SEED = 0
MAX_SENTENCES = 7          # a combined example of 7 sentences is ~460 tokens with the chat template (8: ~520)
PARETO_ALPHA = 1.3         # P(k >= x) = x^-1.3: 59% one sentence, 17% four or more, 8% seven
ONE_FIELD_SHARE = 0.25     # short examples: one field of one sentence (~65 tokens)


# ---------------------------------------------------------------------------------------------- data

def _parse(output: str) -> dict[str, str]:
    """'name=A; city=B; date=C' -> {'name': 'A', 'city': 'B', 'date': 'C'}."""
    return dict(part.split("=", 1) for part in output.split("; "))


def _combined_row(rows: list[dict], rng: random.Random) -> dict:
    """One instruction over k sentences, answered by k numbered key=value lines (k long-tailed)."""
    k = min(MAX_SENTENCES, int(rng.paretovariate(PARETO_ALPHA)))
    picked = rng.sample(rows, k)
    return {"instruction": "For each numbered sentence, extract name, city and date; answer one line per sentence "
                           "as: N. name=...; city=...; date=YYYY-MM-DD",
            "input": "\n".join(f"{i}. {r['input']}" for i, r in enumerate(picked, 1)),
            "output": "\n".join(f"{i}. {r['output']}" for i, r in enumerate(picked, 1))}


def _one_field_row(rows: list[dict], rng: random.Random) -> dict:
    """A short example: one field of one sentence."""
    row = rng.choice(rows)
    field = rng.choice(["name", "city", "date"])
    question = {"name": "Who is the person named?", "city": "Which city is named?",
                "date": "Which date is named? Answer as YYYY-MM-DD."}[field]
    return {"instruction": question, "input": row["input"], "output": _parse(row["output"])[field]}


def variable_rows(n: int, seed: int = SEED) -> list[dict]:
    """n alpaca rows of long-tailed length, built deterministically from the bundled training rows."""
    from peftkit.data import BUNDLED_TRAIN

    rows = [json.loads(line) for line in Path(BUNDLED_TRAIN).read_text().splitlines()]
    rng = random.Random(seed)
    return [_one_field_row(rows, rng) if rng.random() < ONE_FIELD_SHARE else _combined_row(rows, rng)
            for _ in range(n)]


def bench_rows(args: argparse.Namespace) -> list[dict]:
    """The rows both sides train on."""
    if args.data == "variable":
        return variable_rows(args.examples)
    from peftkit.data import BUNDLED_TRAIN

    return [json.loads(line) for line in open(BUNDLED_TRAIN).read().splitlines()[: args.examples]]


def write_rows(args: argparse.Namespace, folder: str) -> str:
    """Write the benchmark rows to <folder>/rows.jsonl (what `peftkit train --data` reads); returns the path."""
    path = os.path.join(folder, "rows.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in bench_rows(args))
    return path


def tokenized(args: argparse.Namespace, rows_file: str) -> tuple[Any, list[dict]]:
    """(tokenizer, [{"input_ids", "labels"}]) tokenized exactly as `peftkit train` tokenizes the rows file."""
    from transformers import AutoTokenizer

    from peftkit import data
    from peftkit.data.prompting import default_prompt_format
    from peftkit.io.models import embedded_folder

    tokenizer = AutoTokenizer.from_pretrained(embedded_folder())
    ds = data.tokenize(data.load_rows(rows_file), tokenizer, fmt="alpaca", max_length=args.max_length,
                       prompt_format=default_prompt_format(tokenizer))
    return tokenizer, [{"input_ids": ids, "labels": labels} for ids, labels in zip(ds["input_ids"], ds["labels"], strict=True)]


def peftkit_plan(args: argparse.Namespace, lengths: list[int], packing: bool = False) -> list[list[int]]:
    """The micro-batches `peftkit train` makes of these examples (epoch 0, seed 0)."""
    from peftkit import data

    return data.batches(lengths, batch_size=args.batch_size, max_length=args.max_length, packing=packing,
                        shuffle=True, seed=SEED, epoch=0)


def padded_positions(plan: list[list[int]], lengths: list[int]) -> list[int]:
    """Positions computed per micro-batch when each is padded to its longest example."""
    return [len(b) * max(lengths[i] for i in b) for b in plan]


# ---------------------------------------------------------------------------------------------- sides

def run_peftkit(args: argparse.Namespace, rows_file: str, lengths: list[int], packing: bool) -> dict:
    """`peftkit.train.run.train` on the rows file (no eval split); times from its metrics.jsonl clock."""
    from peftkit.train.config import TrainConfig
    from peftkit.train.run import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(method="lora", rank=LORA["r"], alpha=LORA["lora_alpha"], dropout=LORA["lora_dropout"],
                          target_modules=",".join(LORA["target_modules"]), data=rows_file, format="alpaca",
                          eval_split="0", lr=LR, epochs=1, batch_size=args.batch_size, max_length=args.max_length,
                          packing=packing, warmup=0, precision=args.precision, seed=SEED, output=f"{tmp}/run")
        result = train(cfg, progress=False)
        records = [json.loads(x) for x in result.run_dir.metrics.read_text().splitlines()]
    ends = [r["elapsed_s"] for r in records if r["kind"] == "train"]
    plan = peftkit_plan(args, lengths, packing)
    positions = [sum(lengths[i] for i in b) for b in plan] if packing else padded_positions(plan, lengths)
    return {"wall_s": ends[-1], "steps": result.steps, "positions": positions, "step_s": _diffs(ends)}


def _diffs(ends: list[float]) -> list[float]:
    """Per-step seconds from cumulative step end times."""
    return [round(b - a, 3) for a, b in zip([0.0, *ends[:-1]], ends, strict=True)]


class _Counting:
    """Wraps a data collator and counts the positions of the batches it makes (padding included)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.positions = inner, []

    def __call__(self, features: list[dict]) -> dict:
        batch = self.inner(features)
        self.positions.append(batch["input_ids"].numel())
        return batch


def _step_clock() -> Any:
    """A TrainerCallback recording on_train_begin and each on_step_end (perf_counter)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.start, self.ends = 0.0, []

        def on_train_begin(self, *_a: Any, **_k: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *_a: Any, **_k: Any) -> None:
            self.ends.append(time.perf_counter() - self.start)

    return Clock()


def run_hf(args: argparse.Namespace, rows_file: str, collator_kind: str) -> dict:
    """PEFT + Trainer with collator_kind "padded" | "grouped" (length-grouped sampler) | "flatten"."""
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer, TrainingArguments

    from peftkit.io.models import load_model

    tokenizer, examples = tokenized(args, rows_file)
    model, _ = load_model()
    model = get_peft_model(model, LoraConfig(**LORA, task_type="CAUSAL_LM"))
    collator = _Counting(DataCollatorWithFlattening() if collator_kind == "flatten"
                         else DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    clock = _step_clock()
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=args.batch_size, learning_rate=LR,
                                  num_train_epochs=1, lr_scheduler_type="cosine", warmup_steps=0, report_to=[],
                                  logging_steps=10_000, save_strategy="no", use_cpu=True, seed=SEED,
                                  dataloader_num_workers=0, remove_unused_columns=False, bf16=args.precision == "amp",
                                  train_sampling_strategy="group_by_length" if collator_kind == "grouped" else "random")
        trainer = Trainer(model=model, args=targs, train_dataset=datasets.Dataset.from_list(examples),
                          data_collator=collator, callbacks=[clock])
        trainer.train()
    return {"wall_s": clock.ends[-1], "steps": len(clock.ends), "positions": collator.positions,
            "step_s": _diffs(clock.ends)}


def run_fixed(args: argparse.Namespace, rows_file: str, side: str) -> dict:
    """Identical padded batches (peftkit's plan, DataCollatorForSeq2Seq) through a minimal loop on each side."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    from peftkit.io.models import load_model

    tokenizer, examples = tokenized(args, rows_file)
    plan = peftkit_plan(args, [len(e["input_ids"]) for e in examples])
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    batches = [collate([examples[i] for i in b]) for b in plan]
    model, _ = load_model()
    torch.manual_seed(SEED)
    model, step_loss = _fixed_model(model, side)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    start, ends = time.perf_counter(), []
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "amp"):
            loss = step_loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ends.append(time.perf_counter() - start)
    return {"wall_s": ends[-1], "steps": len(batches), "positions": [b["input_ids"].numel() for b in batches],
            "step_s": _diffs(ends)}


def _fixed_model(model: Any, side: str) -> tuple[Any, Any]:
    """(model with LoRA, batch -> mean loss over target tokens) for peftkit or PEFT."""
    if side == "fixed-peftkit":
        import peftkit
        from peftkit.train.loop.loss import count_targets, micro_loss

        peftkit.inject(model, peftkit.LoraConfig(r=LORA["r"], lora_alpha=LORA["lora_alpha"],
                                                 target_modules=LORA["target_modules"]))
        return model, lambda b: micro_loss(model, dict(b)) / max(count_targets(b), 1)
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(**LORA, task_type="CAUSAL_LM"))
    return model, lambda b: model(**b, use_cache=False).loss


def one_side(args: argparse.Namespace) -> None:
    """Child process: run one side, print one JSON line."""
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = write_rows(args, tmp)
        lengths = [len(e["input_ids"]) for e in tokenized(args, rows_file)[1]]
        runners = {"peftkit": lambda: run_peftkit(args, rows_file, lengths, False),
                   "peftkit-pack": lambda: run_peftkit(args, rows_file, lengths, True),
                   "hf-padded": lambda: run_hf(args, rows_file, "padded"),
                   "hf-grouped": lambda: run_hf(args, rows_file, "grouped"),
                   "hf-flatten": lambda: run_hf(args, rows_file, "flatten")}
        result = runners[args.side]() if args.side in runners else run_fixed(args, rows_file, args.side)
    tokens = sum(lengths)  # useful = the examples' own tokens, the same on every side
    result.update(side=args.side, tokens=tokens, tokens_per_s=tokens / result["wall_s"],
                  padding=1 - tokens / sum(result["positions"]), largest_batch=max(result["positions"]),
                  peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print("RESULT " + json.dumps(result))


# ---------------------------------------------------------------------------------------------- driver

def length_summary(args: argparse.Namespace) -> str:
    """The token-length distribution of the benchmark's examples (tokenized as the sides see them)."""
    with tempfile.TemporaryDirectory() as tmp:
        lengths = sorted(len(e["input_ids"]) for e in tokenized(args, write_rows(args, tmp))[1])
    q = statistics.quantiles(lengths, n=10, method="inclusive")
    return (f"{len(lengths)} examples ({args.data}), {sum(lengths)} tokens; length min {lengths[0]}, p10 {q[0]:.0f}, "
            f"median {statistics.median(lengths):.0f}, mean {statistics.mean(lengths):.0f}, p90 {q[-1]:.0f}, "
            f"max {lengths[-1]}")


def run_child(args: argparse.Namespace, side: str) -> dict:
    """Run one side in a fresh Python process; its parsed RESULT line."""
    cmd = [sys.executable, __file__, "--side", side, "--examples", str(args.examples), "--data", args.data,
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--precision", args.precision]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("variable", "bundled"), default="variable")
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--precision", choices=("fp32", "amp"), default="fp32", help="The same on both sides.")
    parser.add_argument("--repeats", type=int, default=1, help="Runs per side; medians and min-max are reported.")
    parser.add_argument("--sides", default=",".join(DEFAULT_SIDES), help=f"Comma list of: {', '.join(SIDES)}")
    parser.add_argument("--json", help="Also write every run's raw result to this file.")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return one_side(args)
    print(f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"load average at start {os.getloadavg()[0]:.2f}")
    print(length_summary(args), flush=True)
    results: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):
        for side in args.sides.split(","):
            results.setdefault(side, []).append(run_child(args, side))
            r = results[side][-1]
            print(f"  run {repeat + 1} {side}: {r['tokens_per_s']:.1f} tok/s, {r['wall_s']:.1f} s, "
                  f"{r['peak_rss_bytes'] / 1e9:.2f} GB, load {os.getloadavg()[0]:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    print_table(results, args)


def _spread(values: list[float], fmt: str) -> str:
    med = statistics.median(values)
    return f"{med:{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]" if len(values) > 1 else f"{med:{fmt}}"


def print_table(results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    """Medians with [min-max] per side, then ratios: median of the per-repeat ratios, with their min-max."""
    print(f"\nbatch {args.batch_size}, max_length {args.max_length}, medians of {args.repeats} [min-max]")
    print(f"{'side':14} {'steps':>5} {'useful tok/s':>20} {'train s':>20} {'peak RSS GB':>18} {'padding':>8} "
          f"{'largest batch':>13}")
    for side, runs in results.items():
        print(f"{side:14} {runs[0]['steps']:5d} {_spread([r['tokens_per_s'] for r in runs], '.1f'):>20} "
              f"{_spread([r['wall_s'] for r in runs], '.1f'):>20} "
              f"{_spread([r['peak_rss_bytes'] / 1e9 for r in runs], '.2f'):>18} {runs[0]['padding']:8.1%} "
              f"{runs[0]['largest_batch']:13d}")
    for ours, theirs in PAIRS:
        if ours in results and theirs in results:
            pairs = list(zip(results[ours], results[theirs], strict=True))
            speed = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs]
            rss = [a["peak_rss_bytes"] / b["peak_rss_bytes"] for a, b in pairs]
            print(f"{ours} / {theirs}: tokens/s x{_spread(speed, '.2f')}, peak RSS x{_spread(rss, '.2f')}")


if __name__ == "__main__":
    main()
