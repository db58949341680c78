"""Where each adapter tensor lands in a checkpoint: PEFT module path -> checkpoint key, layout, tied embeddings.

Everything is checked against the checkpoint's headers and a meta-device copy of the model (no weights read)
before the merge writes a byte: a module the model lacks, a shape that does not fit, a LoRA bias for a layer
without bias are errors that name the tensor.

Tied embeddings: with `tie_word_embeddings`, lm_head *is* the input embedding. A LoRA on lm_head must change only
the output projection, so the merged checkpoint gets its own `lm_head.weight` = E + ΔW and the tie is broken in
config.json (adding ΔW to the shared tensor would also change the input embedding: the "merged twice" trap).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.errors import PeftkitError
from peftkit.merging.deltas import LoraDeltas

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class Target:
    """One checkpoint tensor to change: the low-rank delta of `module`, or a full replacement / bias delta."""

    key: str  # key written in the output
    source: str  # key read from the base checkpoint (differs only for an untied lm_head)
    module: str | None = None  # adapter module whose B @ A is added (weights)
    transpose: bool = False  # Conv1D stores W as [in, out]
    bias_of: str | None = None  # adapter module whose bias delta is added (biases)
    full: str | None = None  # key in LoraDeltas.full of a replacement tensor
    dequantize: dict | None = None  # merge into the weight de-quantized as this records (merging/quantized.py)


@dataclass
class MergePlan:
    targets: dict[str, Target] = field(default_factory=dict)  # output key -> target
    untie: bool = False  # lm_head gets its own tensor; config.tie_word_embeddings becomes false
    added: dict[str, str] = field(default_factory=dict)  # new output key -> the existing key it is written after


def find_key(path: str, keys: set[str], prefix: str) -> str | None:
    """Checkpoint key of parameter `path`: as is, or without the model's base prefix (old GPT-2 checkpoints)."""
    if path in keys:
        return path
    if prefix and path.startswith(prefix + ".") and path[len(prefix) + 1:] in keys:
        return path[len(prefix) + 1:]
    return None


def _module(meta: nn.Module, path: str) -> nn.Module | None:
    try:
        return meta.get_submodule(path)
    except AttributeError:
        return None


def plan_merge(deltas: LoraDeltas, meta: PreTrainedModel, shapes: dict[str, tuple[tuple[int, ...], str]]) -> MergePlan:
    """Map every delta onto checkpoint keys, checking modules, shapes and ties; see the module docstring."""
    keys, prefix = set(shapes), getattr(meta, "base_model_prefix", "")
    config = meta.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out_embed = next((n for n, m in meta.named_modules() if m is meta.get_output_embeddings()), None)
    in_embed = next((n for n, m in meta.named_modules() if m is meta.get_input_embeddings()), None)
    plan = MergePlan()
    for path, delta in deltas.deltas.items():
        module = _module(meta, path)
        if not isinstance(module, (nn.Linear, Conv1D)):
            what = "does not exist in" if module is None else f"is a {type(module).__name__} in"
            raise PeftkitError(f"the adapter targets module {path!r}, which {what} this base model "
                               "(was the adapter trained for another model?)")
        conv = isinstance(module, Conv1D)
        d_out, d_in = delta.b.shape[0], delta.a.shape[1]
        want = (d_in, d_out) if conv else (d_out, d_in)
        key = find_key(f"{path}.weight", keys, prefix)
        source = key
        untie = tied and path == out_embed
        if untie:
            source = find_key(f"{in_embed}.weight", keys, prefix)
            key = f"{path}.weight"
        if source is None or key is None:  # (key is None only where source is)
            raise PeftkitError(f"the checkpoint has no tensor for {path}.weight, which the adapter changes")
        if untie:
            plan.untie = True
            if key not in keys:
                plan.added[key] = source
        if tuple(shapes[source][0]) != want:
            raise PeftkitError(f"checkpoint tensor {source!r} has shape {shapes[source][0]} but the adapter's delta for "
                               f"{path!r} needs {want}; the adapter was trained for another model")
        plan.targets[key] = Target(key=key, source=source, module=path, transpose=conv)
        if delta.bias is not None:
            bias_key = find_key(f"{path}.bias", keys, prefix)
            if bias_key is None:
                raise PeftkitError(f"the adapter has a LoRA bias for {path!r}, whose layer has no bias to merge it into")
            plan.targets[bias_key] = Target(key=bias_key, source=bias_key, bias_of=path)
    for name, entries in deltas.full.items():
        key = find_key(name, keys, prefix)
        if key is None:
            raise PeftkitError(f"the adapter saves a full tensor for {name!r} (modules_to_save), which this base model lacks")
        if tuple(shapes[key][0]) != tuple(entries[0][1].shape):
            raise PeftkitError(f"modules_to_save tensor {name!r} has shape {tuple(entries[0][1].shape)} but the "
                               f"checkpoint's {key!r} is {shapes[key][0]}")
        if key in plan.targets:
            raise PeftkitError(f"{key!r} is both LoRA-adapted and saved in full by the adapter; it would be merged twice")
        plan.targets[key] = Target(key=key, source=key, full=name)
    return plan
