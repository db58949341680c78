"""Fused linear + cross-entropy: the LM head and the loss in chunks of rows, so the logits are never whole.

    loss = linear_cross_entropy(hidden, head.weight, head.bias, targets)   # sum over rows, a 0-d fp32 tensor

For N target positions and a vocabulary of V, the plain path materialises N x V logits, an fp32 copy of them for
the softmax, and the same again for their gradient (for a 49k vocabulary, ~600 kB per target token). Here the rows
go through in chunks of about CHUNK_ELEMENTS logits: each chunk's logits, log-sum-exp and loss are computed, and,
while they are at hand, the gradient of the loss with respect to the chunk's logits (softmax - one_hot) is
multiplied straight into the gradients of the hidden states, the weight and the bias. The backward pass then only
scales those by the incoming gradient. It costs the same matmuls as the plain path (one for the logits, one per
input that needs a gradient), in the same dtypes (under autocast, the matmuls run in its dtype; the softmax in
fp32), and holds one chunk of logits at a time.

The gradients are computed during the forward pass only when grad mode is on and only for the inputs that need
one (`ctx.needs_input_grad`), so evaluation under `torch.no_grad()` costs only the forward matmuls, even for a
trainable head.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 8M fp32 values = 32 MB (about 170 rows of a 49k vocabulary)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """Sum over rows of -log softmax(hidden @ weight.T + bias)[target]: a 0-d fp32 tensor.

    hidden [N, H] (only rows that have a target), weight [V, H], bias [V] or None, targets [N] in [0, V).
    chunk_rows: rows per chunk (default: CHUNK_ELEMENTS // V).
    """
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    # Inside forward grad mode is always off, and needs_input_grad follows requires_grad even under no_grad: say
    # from here whether gradients are wanted at all (evaluation of a trainable head must not compute them).
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, rows, torch.is_grad_enabled())


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and every needed gradient chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, grad_enabled):
        need_h, need_w, need_b = ctx.needs_input_grad[:3] if grad_enabled else (False, False, False)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start:start + rows], targets[start:start + rows]
            logits = torch.nn.functional.linear(h, weight, bias).float()        # [n, V] (autocast's dtype, then fp32)
            lse = logits.logsumexp(-1)                                           # [n]
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not (need_h or need_w or need_b):
                continue
            grad = logits.sub_(lse[:, None]).exp_()                             # softmax, in place of the logits
            grad[torch.arange(t.shape[0], device=t.device), t] -= 1.0           # d loss / d logits
            if grad_b is not None:  # need_b
                grad_b += grad.sum(0)
            low = grad.to(_matmul_dtype(weight))
            if grad_h is not None:  # need_h
                grad_h[start:start + rows] = (low @ weight.to(low.dtype)).to(hidden.dtype)
            if grad_w is not None:  # need_w
                grad_w += (low.t() @ h.to(low.dtype)).float()
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = next(saved) * grad_out if need_h else None
        grad_w = (next(saved) * grad_out).to(ctx.dtypes[0]) if need_w else None
        grad_b = (next(saved) * grad_out).to(ctx.dtypes[1]) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None


def _matmul_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the gradient matmuls run in: autocast's when it is on (as the plain path's backward), else the
    weight's."""
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype
