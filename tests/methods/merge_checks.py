"""The merge checks IA3 and VeRA share: a reversible merge keeps the logits, and `peftkit.merge` writes the weights
HF PEFT's `merge_and_unload` writes for the same saved adapter."""

from pathlib import Path

import torch
from peft import PeftModel

import peftkit
from tests.tiny import logits, tiny_input, tiny_model


def assert_merges_as_peft(model: torch.nn.Module, kind: str, folder: Path) -> None:
    """`model` (a tiny `kind` with a trained-like adapter) merges and unmerges to its own logits, and merges to
    PEFT's weights (fp32, <= 1e-6)."""
    ids = tiny_input()
    unmerged = logits(model, ids)
    peftkit.save_adapter(model, folder)
    peftkit.merge_adapter(model)
    assert (logits(model, ids) - unmerged).abs().max() <= 1e-5
    peftkit.unmerge_adapter(model)
    assert (logits(model, ids) - unmerged).abs().max() <= 1e-5
    merged = peftkit.merge(model)
    theirs = PeftModel.from_pretrained(tiny_model(kind), folder).merge_and_unload()
    ours_state, their_state = merged.state_dict(), theirs.state_dict()
    assert ours_state.keys() == their_state.keys()
    assert max((ours_state[k] - their_state[k]).abs().max().item() for k in ours_state) <= 1e-6
