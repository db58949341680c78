"""Greedy answers for exact match, computing no more than the answers need.

1. Layout. A batch of prompts (token ids) is laid out as [shared prefix | left padding | rest of the prompt |
   draft | right padding]: every prompt ends at one column W, so every answer starts there; the prefix all prompts
   share is computed once into the KV cache (shared_prefix.py), and the mask hides the padding, which positions
   (counted over the mask) skip.
2. The reference is the draft (speculative decoding, with the reference as the draft model). A pass over the
   prompts (what generate()'s prefill computes) gives each row's first greedy token; when a quarter of the rows got
   their draft's first token, one teacher-forced pass over the draft columns gives greedy's next token after each
   draft prefix, so each row knows greedy's tokens for as long as greedy follows its draft, plus greedy's own next
   one. Those tokens settle a row when they reach the end token or max_new_tokens (a right answer is its reference
   and then the end token) or when their text can no longer equal the reference (a miss whatever follows: cut
   there). Exact up to floating-point rounding, in which a batched pass and step-by-step decoding differ as much as
   two batch sizes of generate() do; used only where the generation config takes the plain argmax, with drafts
   that decode back to their reference.
3. Only unsettled rows call generate(), continuing from the same cache cut back to their prompts (no second
   prefill); each stops once its answer can no longer equal its reference (`Diverged`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from peftkit.train.loop.loss import head_as_identity, plain_head
from peftkit.train.loop.shared_prefix import (
    MIN_SHARED,
    cache_kwarg,
    common_length,
    prefix_cache,
    returned_cache,
    sharing_blocker,
)

if TYPE_CHECKING:
    from peftkit.io.models import CausalLM

GENERATE_TOKENS = 8192  # exact match's batches: rows x (prompt + answer) tokens of KV cache, ~4 GB for a 7B model
# generation-config fields that make generate() pick something other than the argmax (their defaults do not)
_PROCESSORS = ("repetition_penalty", "no_repeat_ngram_size", "min_length", "min_new_tokens", "bad_words_ids",
               "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id",
               "sequence_bias", "exponential_decay_length_penalty", "renormalize_logits", "guidance_scale")


def token_batches(lengths: list[int], budget: int) -> list[range]:
    """Consecutive rows in batches whose padded size (rows x longest) stays within `budget` (at least one row)."""
    batches, start, longest = [], 0, 0
    for i, length in enumerate(lengths):
        if i > start and (i - start + 1) * max(longest, length) > budget:
            batches.append(range(start, i))
            start, longest = i, 0
        longest = max(longest, length)
    return [*batches, range(start, len(lengths))] if lengths else batches


def greedy_answers(model: CausalLM, tokenizer: Any, prompts: list[list[int]], references: list[str],
                   max_new_tokens: int) -> tuple[list[str], list[bool]]:
    """(greedy answer text, whether it was cut short as a sure miss) for each prompt of one batch (module doc)."""
    device = next(model.parameters()).device
    shareable = sharing_blocker(model, False, False, False) is None  # the shared-prefix machinery handles it
    checkable = shareable and _plain_argmax(model)
    drafts = [_draft(tokenizer, ref, max_new_tokens) or [] for ref in references] if checkable else []
    inputs, width = layout(model, prompts, drafts, tokenizer.pad_token_id, device, shareable)
    answers: list[str | None] = [None] * len(prompts)
    cut = [False] * len(prompts)
    if any(drafts):
        for row, tokens in enumerate(_known_greedy(model, inputs, width, drafts)):
            settled = _settled(tokenizer, tokens, references[row], max_new_tokens)
            if settled is not None:
                answers[row], cut[row] = settled
    rest = [row for row, answer in enumerate(answers) if answer is None]
    if rest:
        diverged = Diverged(tokenizer, [references[row] for row in rest], width)
        out = model.generate(**_continuation(model, inputs, width, rest), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, stopping_criteria=StoppingCriteriaList([diverged]))
        for row, text, stopped in zip(rest, tokenizer.batch_decode(out[:, width:], skip_special_tokens=True),
                                      diverged.stopped, strict=True):
            answers[row], cut[row] = text, stopped
    return [a or "" for a in answers], cut


def _settled(tokenizer: Any, tokens: list[int], reference: str, max_new_tokens: int) -> tuple[str, bool] | None:
    """(answer, cut) when the known first greedy tokens of a row already decide its answer: they reach the end token
    or max_new_tokens (the whole answer), or they can no longer match the reference (a sure miss, cut); else None."""
    if tokenizer.eos_token_id in tokens:
        return tokenizer.decode(tokens[: tokens.index(tokenizer.eos_token_id)], skip_special_tokens=True), False
    if len(tokens) >= max_new_tokens:
        return tokenizer.decode(tokens[:max_new_tokens], skip_special_tokens=True), False
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return None if may_still_match(text, reference) else (text, True)


def may_still_match(text: str, reference: str) -> bool:
    """Whether an answer that starts with `text` can still equal `reference` once stripped, judged conservatively
    on what later tokens cannot change: everything from a replacement character on (a multi-byte character still
    being spelled out in byte tokens), trailing whitespace (decoders' clean-up may drop a space before the next
    token's punctuation) and a last non-ASCII character are ignored."""
    settled = text.split("\ufffd", 1)[0].strip()
    if settled and not settled[-1].isascii():
        settled = settled[:-1].rstrip()
    return reference.strip().startswith(settled)


def layout(model: nn.Module, prompts: list[list[int]], drafts: list[list[int]], pad_id: int, device: Any,
           shareable: bool | None = None) -> tuple[dict[str, Any], int]:
    """(inputs, W): input_ids / attention_mask [B, W + longest draft] laid out as in the module doc, the KV cache of
    the shared prefix when there is one (under the model's cache keyword) and `cached`, the columns the cache
    holds; W is where answers start. shareable: whether the model passes `sharing_blocker` (None: check here)."""
    if shareable is None:
        shareable = sharing_blocker(model, False, False, False) is None
    shared = common_length(prompts) if shareable else 0
    shared = shared if shared >= MIN_SHARED else 0
    width = max(len(p) for p in prompts)
    total = width + max((len(d) for d in drafts), default=0)
    ids = torch.full((len(prompts), total), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), total), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        start = shared + width - len(prompt)  # the rest of the prompt ends at column W
        ids[row, :shared], mask[row, :shared] = torch.tensor(prompt[:shared]), 1
        ids[row, start:width], mask[row, start:width] = torch.tensor(prompt[shared:]), 1
        if row < len(drafts) and drafts[row]:
            end = width + len(drafts[row])
            ids[row, width:end], mask[row, width:end] = torch.tensor(drafts[row]), 1
    inputs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "cached": 0}
    if shared:
        cache = prefix_cache(model, inputs["input_ids"][:1, :shared], len(prompts))
        name = cache_kwarg(model)
        assert name is not None, "a shareable model's forward takes a cache (sharing_blocker)"
        inputs[name], inputs["cached"] = cache, shared
    return inputs, width


def _plain_argmax(model: nn.Module) -> bool:
    """Whether generate() takes the plain argmax: no generation-config field that changes the pick is set."""
    config = getattr(model, "generation_config", None) or GenerationConfig()
    default = GenerationConfig()
    return all(getattr(config, name, None) == getattr(default, name, None) for name in _PROCESSORS)


def _draft(tokenizer: Any, reference: str, max_new_tokens: int) -> list[int] | None:
    """The reference's token ids when greedy decoding could produce them (they decode back to the reference and
    fit max_new_tokens); None otherwise."""
    ids = tokenizer(reference.strip(), add_special_tokens=False)["input_ids"]
    fits = 0 < len(ids) <= max_new_tokens
    return ids if fits and tokenizer.decode(ids, skip_special_tokens=True).strip() == reference.strip() else None


@torch.no_grad()
def _known_greedy(model: nn.Module, inputs: dict[str, Any], width: int, drafts: list[list[int]]) -> list[list[int]]:
    """Per row, the first tokens greedy decoding produces, as far as teacher forcing on its draft tells them.

    Two passes through the cache in `inputs`: the prompts (what generate()'s prefill computes; it gives the first
    greedy token), then, when at least a quarter of the rows got their draft's first token, every draft column: the
    choice after draft[:j + 1] is greedy's next token for as long as greedy has followed the draft. So a row knows
    its draft's longest followed part, then greedy's own next token (the end token when the draft was right).
    """
    first = _greedy(model, inputs, width - inputs["cached"], width, 1)[:, 0].tolist()        # [B]
    hopeful = sum(bool(d) and first[row] == d[0] for row, d in enumerate(drafts))
    if 4 * hopeful < len(drafts):
        return [[token] for token in first]
    total = inputs["input_ids"].shape[1]
    after = _greedy(model, inputs, total - width, total, total - width).tolist()    # [B, T - W]: after draft[:j+1]
    known = []
    for row, draft in enumerate(drafts):
        tokens = [first[row]]
        while len(tokens) <= len(draft) and tokens[-1] == draft[len(tokens) - 1]:
            tokens.append(after[row][len(tokens) - 1])
        known.append(tokens)
    return known


def _greedy(model: nn.Module, inputs: dict[str, Any], columns: int, end: int, keep: int) -> torch.Tensor:
    """Run `columns` more columns (up to `end`) through the model on top of the cache in `inputs` (which then holds
    them too); the greedy choices [B, keep] at the last `keep` of them."""
    ids, mask = inputs["input_ids"][:, :end], inputs["attention_mask"][:, :end]
    name = cache_kwarg(model)
    assert name is not None, "greedy drafts are checked only on shareable models, whose forward takes a cache"
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, end - columns:]
    cache = {name: inputs[name]} if name in inputs else {}
    kwargs = {"input_ids": ids[:, end - columns:], "attention_mask": mask, "position_ids": positions,
              "use_cache": True, "logits_to_keep": keep, **cache}
    head = plain_head(model)
    if head is None:
        out = model(**kwargs)
        choices = out.logits.argmax(-1)
    else:
        with head_as_identity(head):  # hidden states: no [B, keep, V] logits at once
            out = model(**kwargs)
        choices = _chunked_argmax(out.logits, head)
    inputs[name] = returned_cache(out)
    inputs["cached"] = end
    return choices


def _chunked_argmax(hidden: torch.Tensor, head: nn.Linear, rows: int = 1024) -> torch.Tensor:
    """argmax over the vocabulary of head(hidden) [B, K, H] -> [B, K], `rows` positions at a time."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    picks = [F.linear(part, head.weight, head.bias).argmax(-1) for part in flat.split(rows)]
    return torch.cat(picks).view(hidden.shape[:-1])


def _continuation(model: nn.Module, inputs: dict[str, Any], width: int, rows: list[int]) -> dict[str, Any]:
    """generate() inputs for `rows`: their prompts and the cache of their first columns, cut back to W - 1 when it
    reaches further (generate recomputes the last prompt column to get its logits)."""
    name = cache_kwarg(model)
    out: dict[str, Any] = {"input_ids": inputs["input_ids"][rows, :width],
                           "attention_mask": inputs["attention_mask"][rows, :width]}
    cache = inputs.get(name) if name is not None else None
    if name is None or cache is None:
        return out
    if inputs["cached"] >= width:
        if not getattr(cache, "is_croppable", True):  # cannot be cut: generate() prefills the prompts again
            return out
        cache.crop(width - 1 - inputs["cached"])  # a negative count: the columns to drop
    cache.batch_select_indices(torch.tensor(rows, device=out["input_ids"].device))
    out[name] = cache
    return out


class Diverged(StoppingCriteria):
    """Stops each row of a greedy batch once its answer can no longer equal its reference (`may_still_match`);
    `stopped[i]` records which rows were cut (their text ends where it went wrong)."""

    def __init__(self, tokenizer: Any, references: list[str], start: int) -> None:
        self.tokenizer, self.references, self.start = tokenizer, references, start
        self.stopped = [False] * len(references)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        for row, (text, reference) in enumerate(zip(texts, self.references, strict=True)):
            self.stopped[row] = self.stopped[row] or not may_still_match(text, reference)
        return torch.tensor(self.stopped, dtype=torch.bool, device=input_ids.device)
