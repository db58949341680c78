"""GRPO's rollouts: G sampled completions per prompt from the model as it trains, batched, with a KV cache.

What makes it faster than `generate(num_return_sequences=G)` on a PEFT model, with the same samples' distribution:

1. Each prompt is prefilled once, not G times: the prompts are laid out as exact match lays them out
   (evaluation/generation.layout: the prefix all prompts share computed once, then [left padding | rest]), their
   KV cache is repeated G times (`batch_repeat_interleave`), and the G rows of a group decode on top of it.
2. The adapter is merged into the weights while sampling (`merged`), when every adapter can be merged: one matmul
   per layer instead of three. Unmerging is not exact in floating point, so the merged weights' originals are kept
   and copied back after: the trained model is bit-for-bit what it was.
3. One forward per new token for the whole batch, the sampling done here (temperature, top-p, as HF's
   TemperatureLogitsWarper and TopPLogitsWarper), rows that ended feeding the pad token until all have ended.

On a sharded model (FSDP2's DTensors, DeepSpeed ZeRO-3's partitioned parameters) every forward is a collective
each process must make: the processes decide together when all their rows have ended (`_all_done`, an all-reduce
per token), the prompts' shared prefix is not computed separately (one process's prompts may share one, another's
not), and the adapter is not merged (no process holds a whole weight: `can_merge`).

Positions are counted over the attention mask, as generate() counts them, and the training forward
(grpo_loss.completion_logps) takes the same prompt layout, so the log-probs of sampling and training agree.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from peftkit.core.ops import merge_adapter, unmerge_adapter
from peftkit.core.registry import get_method
from peftkit.core.state import adapter_layers, adapters
from peftkit.train.evaluation.generation import layout
from peftkit.train.loop.shared_prefix import cache_kwarg, returned_cache
from peftkit.train.objectives.grpo_loss import positions


@dataclass(frozen=True)
class Sampling:
    """How completions are sampled (TRL's GRPOConfig names). temperature 0: greedy (the held-out score)."""

    num_generations: int = 8
    max_completion_length: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    merge: bool = True          # merge the adapter into the weights while sampling (when it can be merged)


@dataclass
class Rollouts:
    """G completions of each prompt, group after group: prompt rows [N, W] (as laid out for sampling, each prompt
    repeated G times), completion_ids [N, C] (pad after the end), completion_mask [N, C] (1 up to and including
    the end token), `seconds` spent and `tokens` sampled."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    seconds: float
    tokens: int

    def first(self, tokens: int) -> Rollouts:
        """The same completions cut to their first `tokens` tokens."""
        return replace(self, completion_ids=self.completion_ids[:, :tokens],
                       completion_mask=self.completion_mask[:, :tokens])

    def token_lists(self) -> list[list[int]]:
        """Each completion's tokens up to and including its end token."""
        return [r[m.bool()].tolist() for r, m in zip(self.completion_ids.cpu(), self.completion_mask.cpu(),
                                                     strict=True)]

    def batch(self, rows: slice | list[int]) -> dict[str, torch.Tensor]:
        """These rows as a training batch (grpo_loss.completion_logps's keys)."""
        return {"prompt_ids": self.prompt_ids[rows], "prompt_mask": self.prompt_mask[rows],
                "completion_ids": self.completion_ids[rows], "completion_mask": self.completion_mask[rows]}


def pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row [N] from its logits [N, V]: argmax at temperature 0, else a sample of
    softmax(logits / temperature) cut to the smallest set of tokens whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs      # the mass of the more likely tokens
        sorted_probs[(before >= top_p) & (before > 0)] = 0  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def sample(model: nn.Module, prompts: list[list[int]], s: Sampling, pad_id: int, end_ids: list[int],
           generator: torch.Generator | None = None) -> Rollouts:
    """`s.num_generations` completions of each prompt (token ids), in eval mode (restored after)."""
    started = time.perf_counter()
    device = next(model.parameters()).device
    was_training = model.training
    together = partitioned(model)
    model.eval()
    try:
        with merged(model, s.merge):
            inputs, _ = layout(model, prompts, [], pad_id, device, shareable=False if together else None)
            completion = _decode(model, inputs, s, pad_id, end_ids, generator, together)
    finally:
        model.train(was_training)
    group = s.num_generations
    mask = _up_to_end(completion, end_ids)
    return Rollouts(inputs["input_ids"].repeat_interleave(group, 0), inputs["attention_mask"].repeat_interleave(group, 0),
                    completion.masked_fill(mask == 0, pad_id), mask, time.perf_counter() - started,
                    int(mask.sum()))


def _decode(model: nn.Module, inputs: dict[str, Any], s: Sampling, pad_id: int, end_ids: list[int],
            generator: torch.Generator | None, together: bool) -> torch.Tensor:
    """Prefill the rest of the prompts on the shared prefix's cache, repeat it G times, sample token by token
    (until every row has ended on every process when `together`)."""
    name = cache_kwarg(model) or "past_key_values"
    mask = inputs["attention_mask"]
    cached = inputs["cached"]
    cache = {name: inputs[name]} if name in inputs else {}
    out = model(input_ids=inputs["input_ids"][:, cached:], attention_mask=mask,
                position_ids=positions(mask)[:, cached:], use_cache=True, logits_to_keep=1, **cache)
    kv = returned_cache(out)
    kv.batch_repeat_interleave(s.num_generations)
    logits = out.logits[:, -1].repeat_interleave(s.num_generations, 0)
    mask = mask.repeat_interleave(s.num_generations, 0)
    position = positions(mask)[:, -1:]
    ends = torch.tensor(end_ids, device=mask.device)
    done = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
    tokens = []
    for step in range(s.max_completion_length):
        token = pick(logits, s.temperature, s.top_p, generator).masked_fill(done, pad_id)
        tokens.append(token)
        done |= torch.isin(token, ends)
        if step == s.max_completion_length - 1 or _all_done(done, together):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        position = position + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, use_cache=True,
                    **{name: kv})
        kv, logits = returned_cache(out), out.logits[:, -1]
    return torch.stack(tokens, 1)


def _all_done(done: torch.Tensor, together: bool) -> bool:
    """Whether every row has ended; `together`: on every process (summed over them, so all stop at one step)."""
    left = (~done).sum()
    if together:
        import torch.distributed as dist

        dist.all_reduce(left)
    return int(left) == 0


def partitioned(model: nn.Module) -> bool:
    """Whether no process holds the model's parameters whole: FSDP2's DTensors or DeepSpeed ZeRO-3's partitions
    (`ds_id`); its forwards are then collectives of all processes."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


def _up_to_end(completion: torch.Tensor, end_ids: list[int]) -> torch.Tensor:
    """1 for each token up to and including a row's first end token (all of a row that has none), as TRL masks."""
    is_end = torch.isin(completion, torch.tensor(end_ids, device=completion.device))
    after = is_end.long().cumsum(1) - is_end.long()           # end tokens strictly before each column
    return (after == 0).long()


def can_merge(model: nn.Module) -> bool:
    """Whether every adapter on the model folds into weights this process holds whole (no quantized base, no
    sharded weight, mergeable methods, each adapter layer wrapping a base layer)."""
    if getattr(model, "is_quantized", False) or not adapters(model):
        return False
    if not all(get_method(record.method).mergeable for record in adapters(model).values()):
        return False
    layers = [layer for _, layer in adapter_layers(model)]
    return all(isinstance(getattr(layer, "base_layer", None), nn.Module) for layer in layers) and not partitioned(model)


@contextmanager
def merged(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside, the active adapter is merged into the base weights (when `enabled` and `can_merge`); after, the
    weights it changed are copied back from a copy kept meanwhile, exactly (unmerging alone rounds)."""
    if not enabled or not can_merge(model):
        yield
        return
    bases = [layer.base_layer for _, layer in adapter_layers(model)]
    kept = [(p, p.detach().clone()) for base in bases if isinstance(base, nn.Module) for p in base.parameters()]
    merge_adapter(model)
    try:
        yield
    finally:
        unmerge_adapter(model)
        with torch.no_grad():
            for param, original in kept:
                param.copy_(original)   # through the parameter: its version counter moves (caches keyed on it)
