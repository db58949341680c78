"""What sampling from the model during training adds to a step's memory (an online objective, e.g. GRPO).

The objective describes its sampling (`Rollout`, from `Objective.rollout(cfg)` in peftkit.train); the estimator
never names an objective. Per process, with P prompts sampled at once (the whole step's), G completions each
(R = P G rows), rows of S = seq_len positions (prompt + C new tokens), a = the compute dtype's bytes:

    KV cache         2 * layers * kv_dim * S * R * a      keys and values of every sampled row, all positions
                                                          (+ one layer's while a token is appended: torch.cat)
    sampled logits   R * V * (a + 8)                      the last position's logits, their fp32 copy and the
                                                          softmax the next token is drawn from
    prefill          P * S * (3 i + 2 h) * a              one layer's transient while the prompts are prefilled
                                                          (their own cache only: before it is repeated G times)
    merged copy      the adapted linears' base weights    kept whole while the adapter is merged for sampling
                                                          (restored exactly after); none when quantized or sharded
    reference pass   a no-grad forward of a micro-batch's rows (the adapter switched off for the KL term, or the
                     old policy's log-probs for several updates per rollout): one layer's transient and the
                     logits of the C + 1 scored positions, (a + 12) V bytes each (fp32 copy, / temperature,
                     log_softmax); no second copy of the weights
The training step itself scores only the C + 1 completion positions (`logits_to_keep`), so its logits row counts
those positions, not S.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftkit.core.shapes import ModelShape


@dataclass(frozen=True)
class Rollout:
    """How an objective samples before each step: `prompts` sampled at once (per process), `generations` per
    prompt, `new_tokens` per completion, whether a `reference_pass` runs (no grad) and whether the adapter is
    `merged` for sampling."""

    prompts: int
    generations: int
    new_tokens: int
    reference_pass: bool = False
    merged: bool = True

    @property
    def rows(self) -> int:
        """Rows decoded at once: every completion of the step's prompts."""
        return self.prompts * self.generations


def kv_cache_bytes(s: ModelShape, rollout: Rollout, seq_len: int, a: int) -> int:
    """Keys and values of every sampled row at every position (module docstring)."""
    return 2 * s.layers * s.kv_dim * seq_len * rollout.rows * a


def sampled_logits_bytes(s: ModelShape, rollout: Rollout, a: int) -> int:
    """The next-token logits of every sampled row, their fp32 copy and softmax."""
    return rollout.rows * s.vocab * (a + 8)


def layer_transient_bytes(s: ModelShape, rows: int, seq_len: int, a: int) -> int:
    """One decoder layer's largest no-grad temporaries (the MLP's gate, up and product, the residual, its input)."""
    return rows * seq_len * (3 * s.mlp_width + 2 * s.hidden) * a


def scored_logits_bytes(s: ModelShape, rows: int, positions: int, a: int) -> int:
    """Logits of the scored positions in a no-grad pass: the logits, fp32 copy, / temperature, log_softmax."""
    return rows * positions * s.vocab * (a + 12)

