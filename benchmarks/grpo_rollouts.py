"""GRPO rollout speed: peftkit's sampler (rollouts.sample) against HF `generate` on a PEFT LoRA model, same model,
same adapter weights, same sampling settings and batch, measured in the same run.

    python benchmarks/grpo_rollouts.py [--model PATH] [--prompts 8 --generations 8 --tokens 32 --rank 8
                                        --targets all-linear --temperature 1.0 --top-p 1.0 --repeats 2]

The prompts are the bundled extraction task's (rendered with the chat template). Both sides sample exactly
`--tokens` new tokens per completion (the end token is ignored, so they do the same amount of work); HF generates
the G completions of each prompt with num_return_sequences=G (its prefill expands the prompts G times). peftkit:
each prompt prefilled once, the shared prefix once, the adapter merged while sampling (restored exactly), one
forward per token. Prints tokens/s of each and the ratio (best of --repeats). The machine's load matters: run it
on a quiet machine, and both sides run in the same process one after the other.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def prompts(tokenizer, n: int) -> list[list[int]]:
    from peftkit import data
    from peftkit.data.prompting import default_prompt_format, render_prompt
    from peftkit.train.evaluation.heldout import row_to_chat

    rows = [json.loads(line) for line in data.BUNDLED_TRAIN.read_text().splitlines()][:n]
    fmt = default_prompt_format(tokenizer)
    texts = [render_prompt(tokenizer, row_to_chat(row, "alpaca")[0], fmt) for row in rows]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def models(path: str | None, rank: int, targets: str):
    """(PEFT model, peftkit model with the same LoRA weights, tokenizer)."""
    import tempfile

    import peft

    import peftkit
    from peftkit.io.models import load_model

    theirs, tokenizer = load_model(path)
    target = "all-linear" if targets == "all-linear" else targets.split(",")
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target,
                                                         lora_dropout=0.0))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)   # a trained adapter, not B = 0
    ours, _ = load_model(path)
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        peftkit.load_adapter(ours, folder)
    return theirs.eval(), ours.eval(), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="all-linear")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from peftkit.train.objectives.rollouts import Sampling, sample

    theirs, ours, tokenizer = models(args.model, args.rank, args.targets)
    ids = prompts(tokenizer, args.prompts)
    pad = tokenizer.pad_token_id
    new = args.prompts * args.generations * args.tokens
    width = max(map(len, ids))
    batch = torch.full((len(ids), width), pad)
    mask = torch.zeros_like(batch)
    for row, p in enumerate(ids):
        batch[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1

    def hf() -> None:
        with torch.no_grad():
            theirs.generate(input_ids=batch, attention_mask=mask, do_sample=True, temperature=args.temperature,
                            top_p=args.top_p, top_k=0, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                            num_return_sequences=args.generations, pad_token_id=pad)

    def peftkit_sample() -> None:
        sample(ours, ids, Sampling(args.generations, args.tokens, args.temperature, args.top_p), pad, [])

    times = {}
    for name, run in (("hf generate (PEFT)", hf), ("peftkit rollouts", peftkit_sample)):
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
        times[name] = best
        print(f"{name:20s} {best:8.2f} s  {new / best:9.1f} tokens/s")
    ratio = times["hf generate (PEFT)"] / times["peftkit rollouts"]
    print(f"{args.prompts} prompts x {args.generations} completions x {args.tokens} tokens, rank {args.rank} on "
          f"{args.targets}, {torch.get_num_threads()} threads: peftkit / HF = {ratio:.2f}x")


if __name__ == "__main__":
    main()
