"""DoRA (Liu et al. 2024, arXiv:2402.09353): LoRA's update split into a direction and a learned magnitude.

    V = W + s·B A                        the LoRA-updated weight, [out, in] (s = LoRA's scaling)
    g = m / ‖V‖_row                      m: `lora_magnitude_vector`, one value per output row; ‖V‖_row the L2 norm of
                                         each row of V, detached from the graph (section 4.3 of the paper, as PEFT)
    y = g ⊙ (V x) + b                    the layer's output (b: the base layer's bias, not rescaled)

m starts at ‖W‖_row (B = 0), so an injected model equals its base. The forward is written as PEFT 0.21 writes it,
on top of the base output r = W x + b:

    y = r + (g − 1) ⊙ (W x) + g ⊙ s·B A x'

where x' = dropout(x). Without dropout (or in eval) W x is r − b, so no second product with W is needed; with
dropout in training W x' is computed again on the dropped-out input, so the whole output sees the same x'.
Merging writes W' = g ⊙_row V into the weight (bias unchanged); unmerging needs the same g, kept from the merge.

The row norm costs a full [out, in] product B A; `NormCache` keeps it while not training, keyed by the storage and
version counter of W, A and B, so an optimizer step or a `copy_` recomputes it (see its docstring).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

ROW_CHUNK = 4096  # rows of V formed at once: bounds the fp32 temporary to ROW_CHUNK x in_features


@torch.no_grad()
def row_norm(weight: torch.Tensor, fan_in_fan_out: bool, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖W + s·B A‖ per output row, in fp32 (no grad, autocast off: B A stays fp32 under amp), a chunk of rows at a
    time. `weight` is the base layer's own tensor ([in, out] for GPT-2's Conv1D when `fan_in_fan_out`), A [r, in],
    B [out, r]."""
    a32 = a.float()
    out_features = b.shape[0]
    norms = torch.empty(out_features, dtype=torch.float32, device=b.device)
    with torch.autocast(b.device.type, enabled=False):
        for start in range(0, out_features, ROW_CHUNK):
            rows = slice(start, start + ROW_CHUNK)
            w = weight[:, rows].T if fan_in_fan_out else weight[rows]
            v = w.float() + scaling * (b[rows].float() @ a32)
            norms[rows] = torch.linalg.vector_norm(v, dim=1)
    return norms


class NormCache:
    """Row norms per adapter, reused while their inputs are unchanged.

    The key of an entry is (storage address, version counter) of W, A and B, plus the scaling and whether inference
    mode is on: every in-place change through autograd-visible ops (an optimizer step, `param.copy_`,
    `load_state_dict`) bumps a version counter, and moving or re-casting a tensor changes its storage, so either
    makes the entry stale. Writes through `.data` bypass the version counter: the layer clears the cache itself
    when it writes that way (merge, unmerge, PiSSA's init), and `module.train()` / `.eval()` clear it too.
    """

    def __init__(self) -> None:
        self.entries: dict[str, tuple[tuple, torch.Tensor]] = {}

    @staticmethod
    def key(tensors: tuple[torch.Tensor, ...], scaling: float) -> tuple | None:
        """The entry key, or None when a tensor has no version counter (an inference tensor): then no caching."""
        try:
            return (*((t.data_ptr(), t._version) for t in tensors), scaling, torch.is_inference_mode_enabled())
        except RuntimeError:
            return None

    def get(self, name: str, key: tuple | None) -> torch.Tensor | None:
        entry = self.entries.get(name)
        return entry[1] if entry is not None and key is not None and entry[0] == key else None

    def put(self, name: str, key: tuple | None, norm: torch.Tensor) -> None:
        if key is not None:
            self.entries[name] = (key, norm)

    def clear(self, name: str | None = None) -> None:
        if name is None:
            self.entries.clear()
        else:
            self.entries.pop(name, None)


def dora_delta(h: torch.Tensor, result: torch.Tensor, *, base_layer: nn.Module, fan_in_fan_out: bool,
               lora_a: nn.Linear, lora_b: nn.Linear, dropout: nn.Module, scaling: float, magnitude: torch.Tensor,
               norm: torch.Tensor, training: bool) -> torch.Tensor:
    """(g − 1) ⊙ W x' + g ⊙ s·B A x' in the adapter's dtype, to add to the base output `result` (= W x + b).

    h: the input cast to the adapter's dtype; norm: ‖W + s·B A‖_row (fp32, detached).
    """
    if training and not isinstance(dropout, nn.Identity):
        h = dropout(h)
        w = cast(torch.Tensor, base_layer.weight)  # a linear layer's weight (Module.__getattr__ says Tensor | Module)
        base = F.linear(h.to(w.dtype), w.T if fan_in_fan_out else w).to(h.dtype)
    else:
        bias = getattr(base_layer, "bias", None)
        base = (result if bias is None else result - bias).to(h.dtype)
    g = magnitude / norm.to(magnitude.dtype)
    return (g - 1) * base + g * (lora_b(lora_a(h)) * scaling)
