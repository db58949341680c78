"""`peftkit eval [--model M] [--adapter DIR] [--data D]`: loss, perplexity, exact match where rows have answers,
forgetting (the loss change on bundled general text against the base) and the size of what a run saved.

Without --data it evaluates on the bundled task's held-out split (peftkit/data/task_eval.jsonl), the same 50
examples `peftkit train` reports before and after training with no arguments.

Prompts are rendered with the adapter's saved prompt format (else the tokenizer's chat template, else the plain
template), exactly as in training; loss counts only the answer tokens, like the training loss.
"""

from __future__ import annotations

from typing import Annotated

import typer

from peftkit.cli._app import app
from peftkit.cli._options import Adapter, DequantizedBase, Json, Model, print_json


@app.command("eval")
def eval_cmd(
    data: Annotated[str | None, typer.Option("--data", "-d", help="Data file / folder / hub name (alpaca, messages or text); default: the bundled task's eval split.")] = None,
    model: Model = None,
    adapter: Adapter = None,
    format: Annotated[str, typer.Option("--format", help="auto | alpaca | messages | text.")] = "auto",
    split: Annotated[str | None, typer.Option("--split", help="Split of a hub dataset.")] = None,
    max_examples: Annotated[int, typer.Option("--max-examples", min=1, help="Evaluate at most this many rows.")] = 50,
    max_length: Annotated[int, typer.Option("--max-length", min=8, help="Tokens per example (prompt and answer); longer ones are truncated.")] = 512,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Examples per forward pass.")] = 8,
    json_out: Json = False,
    dequantized_base: DequantizedBase = False,
    precision: Annotated[str, typer.Option("--precision", help="auto (bf16 autocast where training would use amp, as its own eval does) | fp32.")] = "auto",
    forgetting: Annotated[bool, typer.Option("--forgetting/--no-forgetting", help="Also score bundled general text (24 paragraphs) against the base: the loss change is the forgetting.")] = True,
) -> None:
    """Evaluate a base model or an adapter on held-out data."""
    from peftkit.train.evaluation.command import evaluate

    result = evaluate(model, adapter, data, fmt=format, split=split, max_examples=max_examples,
                      max_length=max_length, batch_size=batch_size, dequantized=dequantized_base,
                      with_forgetting=forgetting, precision=precision)
    if json_out:
        print_json(result)
        return
    print(f"examples: {result['n_examples']} ({result['format']}), target tokens: {result['targets']}")
    print(f"loss: {result['loss']:.4f}  perplexity: {result['perplexity']:.2f}")
    if result.get("exact_match") is not None:
        print(f"exact match: {result['exact_match']:.1%} of {result['n']}")
    if "forgetting" in result:
        print(f"general text loss: {result['general_loss']:.4f} (base {result['general_loss_base']:.4f}), "
              f"forgetting: {result['forgetting']:+.4f}")
    if "saved_parameters" in result:
        print(f"saved: {result['saved_parameters']:,} parameters, {result['saved_bytes'] / 2**20:.2f} MiB")
