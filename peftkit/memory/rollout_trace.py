"""The traced step of an objective that samples (`TrainingSetup.rollout`, generation.py): the rollout, then the
update on the rollout rows, tracked by the same `LiveBytes` counter as step_trace's step.

Rollout (no grad, eval mode): the P prompts are prefilled with a KV cache, the cache is repeated G times
(`batch_repeat_interleave`, as train/objectives/rollouts.py does), and the R = P G rows decode a token drawn from
the softmax of the last position's fp32 logits. Every decode step holds the same temporaries and the cache peaks
at the last one, so the trace prefills S - 1 positions and decodes one step (C steps on fake tensors would cost
minutes, not memory). The adapter is not merged here (the merged copy is an analytic term). Update: the forward scores only the C + 1 completion positions
(`logits_to_keep`), the loss is the mean token log-prob of the completion under log_softmax of fp32 logits (GRPO's
clipped surrogate is elementwise on [R, C]: its memory is that of the log-probs), then backward. The reference
pass is not traced (a no-grad forward: below the update's peak).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from peftkit.memory.live_bytes import LiveBytes
from peftkit.memory.training_setup import TrainingSetup

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@torch.no_grad()
def trace_rollout(model: PreTrainedModel, setup: TrainingSetup, counter: LiveBytes) -> None:
    """Sample the rollout rows as the trainer does (module docstring), phase "rollout"."""
    rollout = setup.rollout
    assert rollout is not None, "a setup that samples"
    counter.set_phase("rollout")
    was_training = model.training
    model.eval()
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=setup.precision == "amp")
    ids = torch.zeros(rollout.prompts, max(setup.seq_len - 1, 1), dtype=torch.long)
    with amp:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        cache.batch_repeat_interleave(rollout.generations)
        logits = out.logits[:, -1].repeat_interleave(rollout.generations, 0)
        del out
        token = torch.softmax(logits.float(), -1).argmax(-1, keepdim=True)
        logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]
    del cache, logits, token
    model.train(was_training)


def rollout_loss(model: PreTrainedModel, ids: torch.Tensor, setup: TrainingSetup) -> torch.Tensor:
    """The update's loss on the rollout rows: only the completion positions are scored (module docstring)."""
    assert setup.rollout is not None, "a setup that samples"
    keep = setup.rollout.new_tokens + 1
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits[:, :-1].float()
    logps = torch.log_softmax(logits, -1).gather(-1, ids[:, -keep + 1:, None])
    return -logps.mean()
