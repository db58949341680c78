"""`contiguous_head_input` (io/models.py): the LM head sees a contiguous input, computes the same thing, once hooked.

Generation slices the last position (`hidden[:, -1:, :]`) before the head; torch's linear on that strided view
expands the weight per row (seconds for a large vocabulary), so every model peftkit loads gets the hook."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peftkit.io.models import contiguous_head_input
from tests.tiny import tiny_model


def test_the_lm_head_gets_a_contiguous_input_and_the_same_output():
    model = tiny_model("llama")
    contiguous_head_input(model)
    contiguous_head_input(model)  # idempotent: one hook
    head = model.get_output_embeddings()
    assert len(head._forward_pre_hooks) == 1
    seen = []
    head.register_forward_hook(lambda module, args, out: seen.append(args[0].is_contiguous()))
    hidden = torch.randn(3, 5, 32)[:, -1:, :]
    assert not hidden.is_contiguous()
    torch.testing.assert_close(head(hidden), F.linear(hidden, head.weight))
    assert seen == [True]


def test_generation_is_unchanged_by_the_hook():
    ids = torch.randint(1, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    plain = tiny_model("qwen2").generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    model = tiny_model("qwen2")
    contiguous_head_input(model)
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0), plain)
