"""What a fine-tune costs beyond its task: forgetting on general text, and the size of what it saved.

    loss_on_rows(model, tokenizer, rows, "text", prompt_format) -> {"loss", "perplexity", "targets"}
    forgetting(model, tokenizer, base=None) -> {"general_loss", "general_loss_base", "forgetting"}
    saved_weights("out/run/adapter") -> {"saved_parameters", "saved_bytes"}

Forgetting is measured as in Biderman et al. (2024, "LoRA learns less and forgets less"): the change of the mean
token loss on text the task never touches, tuned minus base (positive: the tuned model predicts general text
worse). The text is GENERAL_TEXT, 24 short paragraphs of everyday encyclopedic prose (bread, volcanoes, chess,
...; about 2,000 tokens) written for peftkit, scored as plain text: every token is a target, no prompt format.
The base is the same model with its adapter switched off (`disable_adapters`: no second copy), or, for a whole
fine-tuned model, a separately loaded base (`base`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from peftkit import data
from peftkit.core.ops import disable_adapters
from peftkit.core.state import adapters
from peftkit.errors import PeftkitError
from peftkit.train.evaluation.heldout import eval_loss
from peftkit.train.loop.loss import loss_path
from peftkit.train.loop.shared_prefix import sharing_blocker
from peftkit.train.splits import Split, collate_fn

if TYPE_CHECKING:
    from datasets import Dataset

    from peftkit.io.models import CausalLM

GENERAL_TEXT = Path(data.__file__).parent / "general_text.jsonl"


def loss_on_rows(model: CausalLM, tokenizer: Any, rows: Dataset, fmt: str, prompt_format: dict | None, *,
                 max_length: int = 512, batch_size: int = 8) -> dict[str, Any]:
    """Mean loss and perplexity of `model` over the answer tokens of `rows` (every token for `text` rows), in
    batches of `batch_size` in row order, rendered and masked exactly as training renders them."""
    ds = data.tokenize(rows, tokenizer, fmt=fmt, max_length=max_length, prompt_format=prompt_format)
    if len(ds) == 0:
        raise PeftkitError(f"no example has an answer token within --max-length {max_length}")
    tokenized = Split(ds["input_ids"][:], ds["labels"][:], ds["length"][:], [])  # lists, not datasets Columns
    share = sharing_blocker(model, packing=False, checkpointing=False, sharded=False) is None
    collate = collate_fn(tokenized, tokenizer.pad_token_id, False, next(model.parameters()).device, share)
    plan = [list(range(i, min(i + batch_size, len(ds)))) for i in range(0, len(ds), batch_size)]
    return {"n_examples": len(ds), **eval_loss(model, collate, plan, loss_path(model))}


def forgetting(model: CausalLM, tokenizer: Any, base: CausalLM | None = None,
               base_loss: float | None = None) -> dict[str, float]:
    """General-text loss of `model`, of its base, and the difference (see the module docstring).

    base: a separately loaded base model (for whole fine-tunes); None: `model`'s adapter switched off (a model
    without an adapter is its own base, so its forgetting is 0). base_loss: the base's loss when already known
    (`general_text_loss` of the base; a benchmark scoring many runs of one base computes it once).
    """
    tuned = general_text_loss(model, tokenizer)
    if base_loss is not None:
        before = base_loss
    elif base is not None:
        before = general_text_loss(base, tokenizer)
    elif adapters(model):
        with disable_adapters(model):
            before = general_text_loss(model, tokenizer)
    else:
        before = tuned
    return {"general_loss": tuned, "general_loss_base": before, "forgetting": tuned - before}


def general_text_loss(model: CausalLM, tokenizer: Any) -> float:
    """Mean token loss of `model` on GENERAL_TEXT, as plain text."""
    return loss_on_rows(model, tokenizer, data.load_rows(str(GENERAL_TEXT)), "text", None)["loss"]


def saved_weights(folder: str | Path) -> dict[str, int]:
    """Parameters and bytes of the weights a run saved: an adapter folder's adapter_model.safetensors or a whole
    model folder's *.safetensors shards (the numbers PEFT's method comparison calls the file size)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise PeftkitError(f"{folder} holds no .safetensors weights (expected an adapter or a model folder)")
    parameters = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            parameters += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())  # noqa: SIM118
    return {"saved_parameters": parameters, "saved_bytes": sum(f.stat().st_size for f in files)}
