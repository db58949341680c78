"""Evaluate a model, or a model with an adapter, on held-out data: the library behind `peftkit eval`.

Prompts are rendered with the adapter's saved prompt format (else the tokenizer's chat template, else the plain
template), exactly as in training; the loss counts only the answer tokens, like the training loss; exact match
compares greedy answers with the references where rows have them (train/evaluation/heldout.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit import data
from peftkit.errors import PeftkitError
from peftkit.io.adapters import META_NAME, adapter_base_model
from peftkit.io.models import load_model
from peftkit.train.devices.precision import inference_autocast, resolve_auto
from peftkit.train.evaluation.forgetting import forgetting, loss_on_rows, saved_weights
from peftkit.train.evaluation.heldout import exact_match, references
from peftkit.train.evaluation.loading import load_for_inference

if TYPE_CHECKING:
    from peftkit.io.models import CausalLM


def evaluate(model_name: str | None, adapter: str | None, source: str | None = None, *, fmt: str = "auto",
             split: str | None = None, max_examples: int = 50, max_length: int = 512, batch_size: int = 8,
             dequantized: bool = False, with_forgetting: bool = True, precision: str = "auto") -> dict[str, Any]:
    """`peftkit eval`: load the model (and adapter, `loading.load_for_inference`), then loss / perplexity and, with
    references, exact match.

    source: data file / folder / hub name (default: the bundled task's eval split). with_forgetting: also the loss
    on general text against the base (`forgetting.forgetting`). An adapter or a model folder also reports the
    parameters and bytes it saved. precision: "auto" scores under bf16 autocast where training would use amp (as
    training's own held-out evaluation does; several times faster on a bf16 CPU), "fp32" without autocast.
    """
    if precision not in ("auto", "fp32"):
        raise PeftkitError(f"--precision must be auto or fp32, got {precision!r}")
    source = source or str(data.BUNDLED_EVAL)
    rows = data.load_rows(source, split=split)
    if len(rows) == 0:
        raise PeftkitError(f"the data {source!r} has no rows")
    rows = rows.select(range(min(len(rows), max_examples)))
    fmt = data.detect_format(rows.column_names) if fmt == "auto" else fmt
    loaded = load_for_inference(model_name, adapter, dequantized=dequantized)
    lm, tokenizer, prompt_format = loaded.model, loaded.tokenizer, loaded.prompt_format
    with inference_autocast(next(lm.parameters()).device, precision):
        result: dict[str, Any] = {"format": fmt, "precision": resolve_auto(precision),
                                  **loss_on_rows(lm, tokenizer, rows, fmt, prompt_format, max_length=max_length,
                                                 batch_size=batch_size)}
        if fmt in ("alpaca", "messages"):
            result.update(exact_match(lm, tokenizer, references(rows, fmt), prompt_format))
        if with_forgetting:
            result.update(forgetting(lm, tokenizer, _separate_base(model_name, adapter)))
    if adapter or _is_finetune(model_name):
        result.update(saved_weights(adapter or str(model_name)))
    return result


def _separate_base(model_name: str | None, adapter: str | None) -> CausalLM | None:
    """The base of a whole fine-tuned model folder (its peftkit.json records it), loaded; None otherwise (an adapter
    is switched off instead, and a plain model is its own base)."""
    if adapter or not _is_finetune(model_name):
        return None
    return load_model(adapter_base_model(str(model_name)))[0]


def _is_finetune(model_name: str | None) -> bool:
    """A whole model folder that peftkit's full or freeze fine-tuning wrote (it records its base)."""
    return bool(model_name) and (Path(str(model_name)) / META_NAME).is_file()

