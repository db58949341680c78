"""Training throughput: peftkit vs HF PEFT + transformers Trainer on the embedded SmolLM2-135M-Instruct.

    python benchmarks/train_throughput.py --examples 64 --batch-size 8 --repeats 3

Both sides train LoRA r=8 (alpha 16, q_proj/v_proj, no dropout) with AdamW, lr 2e-4, one epoch over the same
first N examples of the bundled task, tokenized once by peftkit.data (identical input_ids and labels), fp32 CPU.
Each side runs in its own fresh process so peak RSS (ru_maxrss) is its own. Reported per side: useful tokens/s
(non-padding tokens of the examples / training wall time), training wall time, peak RSS, and ratios vs peftkit.

Sides:
  peftkit       `peftkit.train.run.train` (length-grouped batches, loss only at target positions)
  peftkit-pack  the same with --packing (padding-free rows, position ids restart per example)
  hf-padded     PEFT + Trainer + DataCollatorForSeq2Seq (padded batches; Trainer defaults, no length grouping)
  hf-flatten    PEFT + Trainer + DataCollatorWithFlattening (HF's padding-free collator)
  fixed-peftkit / fixed-hf  the same pre-built padded batch tensors through a plain loop on each side (model +
                injection + loss cost only): peftkit's LoRA layer and target-only loss vs PEFT's LoRA + HF loss
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

SIDES = ("peftkit", "peftkit-pack", "hf-padded", "hf-flatten", "fixed-peftkit", "fixed-hf")


def _examples(args: argparse.Namespace):
    """(tokenizer, [{"input_ids", "labels"}]) for the first args.examples bundled rows, tokenized by peftkit."""
    from transformers import AutoTokenizer

    from peftkit import data
    from peftkit.models import embedded_folder
    from peftkit.prompting import default_prompt_format
    from peftkit.train.datasetup import BUNDLED_TRAIN

    tokenizer = AutoTokenizer.from_pretrained(embedded_folder())
    rows = data.load_rows(str(BUNDLED_TRAIN)).select(range(args.examples))
    ds = data.tokenize(rows, tokenizer, fmt="alpaca", max_length=args.max_length,
                       prompt_format=default_prompt_format(tokenizer))
    return tokenizer, [{"input_ids": i, "labels": l} for i, l in zip(ds["input_ids"], ds["labels"])]


def run_peftkit(args: argparse.Namespace, packing: bool) -> float:
    from peftkit.train.config import TrainConfig
    from peftkit.train.run import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(method="lora", rank=8, alpha=16, dropout=0.0, target_modules="q_proj,v_proj",
                          data=_rows_file(args, tmp), format="alpaca", eval_split="0", lr=2e-4, epochs=1,
                          batch_size=args.batch_size, max_length=args.max_length, packing=packing, warmup=0,
                          precision="fp32", output=f"{tmp}/run")
        result = train(cfg, echo=lambda _m: None, progress=False)
        records = [json.loads(x) for x in open(f"{tmp}/run/metrics.jsonl")]
    return [r for r in records if r["kind"] == "train"][-1]["elapsed_s"] if result.steps else 0.0


def _rows_file(args: argparse.Namespace, tmp: str) -> str:
    from peftkit.train.datasetup import BUNDLED_TRAIN

    lines = open(BUNDLED_TRAIN).read().splitlines()[: args.examples]
    path = f"{tmp}/rows.jsonl"
    open(path, "w").write("\n".join(lines) + "\n")
    return path


def run_hf(args: argparse.Namespace, flatten: bool) -> float:
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import (DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer, TrainingArguments)

    from peftkit.models import load_model

    tokenizer, examples = _examples(args)
    model, _ = load_model()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    collator = (DataCollatorWithFlattening() if flatten
                else DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=args.batch_size, learning_rate=2e-4,
                                  num_train_epochs=1, lr_scheduler_type="cosine", warmup_steps=0, report_to=[],
                                  logging_steps=10_000, save_strategy="no", use_cpu=True, seed=0,
                                  dataloader_num_workers=0, remove_unused_columns=False)
        trainer = Trainer(model=model, args=targs, train_dataset=datasets.Dataset.from_list(examples),
                          data_collator=collator)
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start


def run_fixed(args: argparse.Namespace, side: str) -> float:
    """Identical padded batches (DataCollatorForSeq2Seq, fixed order) through a minimal loop on each side."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    from peftkit.models import load_model

    tokenizer, examples = _examples(args)
    model, _ = load_model()
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    batches = [collate(examples[i:i + args.batch_size]) for i in range(0, len(examples), args.batch_size)]
    torch.manual_seed(0)
    if side == "fixed-peftkit":
        import peftkit
        from peftkit.train.loss import count_targets, micro_loss

        peftkit.inject(model, peftkit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        step_loss = lambda b: micro_loss(model, dict(b)) / max(count_targets(b), 1)  # noqa: E731
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM"))
        step_loss = lambda b: model(**b, use_cache=False).loss  # noqa: E731
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    start = time.perf_counter()
    for batch in batches:
        step_loss(batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def one_side(args: argparse.Namespace) -> None:
    """Child process: run one side, print one JSON line."""
    runners = {"peftkit": lambda: run_peftkit(args, False), "peftkit-pack": lambda: run_peftkit(args, True),
               "hf-padded": lambda: run_hf(args, False), "hf-flatten": lambda: run_hf(args, True),
               "fixed-peftkit": lambda: run_fixed(args, "fixed-peftkit"), "fixed-hf": lambda: run_fixed(args, "fixed-hf")}
    tokens = sum(len(e["input_ids"]) for e in _examples(args)[1])  # useful = non-padding tokens, same both sides
    wall = runners[args.side]()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps({"side": args.side, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
                                  "peak_rss_bytes": rss}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="Runs per side; the median is reported.")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return one_side(args)
    results: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for side in args.sides.split(","):
            cmd = [sys.executable, __file__, "--side", side, "--examples", str(args.examples),
                   "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
            results.setdefault(side, []).append(json.loads(line[7:]))
    _print_table(results, args)


def _print_table(results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    med = {s: {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "tokens_per_s", "peak_rss_bytes")}
           for s, runs in results.items()}
    print(f"{args.examples} examples, batch {args.batch_size}, max_length {args.max_length}, medians of {args.repeats}")
    print(f"{'side':14} {'useful tok/s':>12} {'wall s':>8} {'peak RSS GB':>12}")
    for side, m in med.items():
        print(f"{side:14} {m['tokens_per_s']:12.1f} {m['wall_s']:8.1f} {m['peak_rss_bytes'] / 1e9:12.2f}")
    pairs = [("peftkit", "hf-padded"), ("peftkit-pack", "hf-padded"), ("peftkit", "hf-flatten"),
             ("peftkit-pack", "hf-flatten"), ("fixed-peftkit", "fixed-hf")]
    for ours, theirs in pairs:
        if ours in med and theirs in med:
            print(f"{ours} / {theirs}: tokens/s x{med[ours]['tokens_per_s'] / med[theirs]['tokens_per_s']:.2f}, "
                  f"peak RSS x{med[ours]['peak_rss_bytes'] / med[theirs]['peak_rss_bytes']:.2f}")


if __name__ == "__main__":
    main()
