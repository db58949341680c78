"""GRPO inside a run (see `ObjectiveRun`): rollouts in `step_batches`, the loss of grpo_loss.py, statistics.

Per optimizer step, `step_batches(model, indices_per_micro)` takes the step's prompts (each micro-batch's
indices are prompts), samples G completions of each (rollouts.sample, one batch for the whole step), scores them
with every reward function, computes the group-normalised advantages, and, where needed, the old policy's
log-probs (num_iterations > 1) and the reference's (beta > 0: the adapter switched off); it returns one
micro-batch per micro-batch of prompts, holding their G x prompts completions. With num_iterations > 1 the same
batches come back for that many optimizer steps (the step's own prompts are then not sampled: the loop's count
of steps stays the optimizer's). The statistics (`stats`) are TRL's names: reward, reward_std,
rewards/NAME/mean and /std, completions/mean_length, kl, entropy, clip_ratio/*, frac_reward_zero_std, plus
rollout_s and update_s (the wall time of sampling, a mean over the processes, and of the rest of the step).

A checkpoint keeps the sampler's generator and the batches kept for reuse (`state_dict`), so a resumed run samples
and trains as the uninterrupted one. The held-out score (`evaluate`) generates each greedy completion once and
derives both the rewards and, where every held-out row has a reference, exact match from it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from peftkit.core.ops import disable_adapters
from peftkit.train.evaluation.heldout import answer_tokens, match_result
from peftkit.train.objectives import grpo_loss as gl
from peftkit.train.objectives.base import ObjectiveRun, exact_match_text
from peftkit.train.objectives.grpo_prompts import Prompts
from peftkit.train.objectives.rewards import Reward, build
from peftkit.train.objectives.rollouts import Rollouts, Sampling, sample

if TYPE_CHECKING:
    from peftkit.train.run import Session

EVAL_PROMPTS = 32  # held-out prompts per greedy batch


class GrpoRun(ObjectiveRun):
    """GRPO's per-run state: the prompts, the sampler's settings and generator, the kept batches, running sums."""

    def __init__(self, train: Prompts, held: Prompts | None, tokenizer: Any, base: Any, sampling: Sampling,
                 settings: gl.LossSettings, rewards: list[Reward], scale: str, iterations: int, seed: int,
                 device: Any) -> None:
        self.train, self.held, self.tokenizer, self.base = train, held, tokenizer, base
        self.sampling, self.settings, self.rewards, self.scale, self.iterations = (sampling, settings, rewards,
                                                                                   scale, iterations)
        self.device = device  # where sampling runs (a sharded model's parameters are not placed before `prepare`)
        self.generator = torch.Generator(device).manual_seed(seed)
        self.ends = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.kept: list[dict[str, Any]] = []
        self.reuse = 0
        self.sums: dict[str, float] = {}
        self.sampled_at = time.perf_counter()
        self.sampler: Callable[..., Rollouts] = sample  # rollouts.sample's signature (start_run: vLLM's, maybe)

    # -- the step ---------------------------------------------------------------------------------------------
    def step_batches(self, model: Any, indices_per_micro: list[list[int]]) -> list[dict[str, Any]]:
        if self.reuse > 0:
            self.reuse -= 1
            self.sampled_at = time.perf_counter()
            return self.kept
        flat = [i for micro in indices_per_micro for i in micro]
        rollouts = self.sampler(self.base, [self.train.prompt_ids[i] for i in flat], self.sampling,
                                self.tokenizer.pad_token_id, self.ends, self.generator)
        per_function = self.score(self.train, flat, rollouts)                     # [N, F]
        weights = torch.tensor([r.weight for r in self.rewards], dtype=torch.float32)
        total = (per_function * weights).sum(1)
        advantages, zero_std = gl.group_advantages(total, self.sampling.num_generations, self.scale)
        self._add_rollout_stats(per_function, total, zero_std, rollouts)
        batches, start = [], 0
        for micro in indices_per_micro:
            rows = slice(start, start + len(micro) * self.sampling.num_generations)
            start = rows.stop
            batches.append(self._batch(model, rollouts, rows, advantages[rows]))
        self.kept, self.reuse = batches, self.iterations - 1
        self.sampled_at = time.perf_counter()
        return batches

    def score(self, prompts: Prompts, flat: list[int], rollouts: Rollouts) -> torch.Tensor:
        """[N, F]: each reward function's values for the N completions (TRL's call: prompts, completions,
        completion_ids and the data's columns, one value per completion)."""
        group = rollouts.completion_ids.shape[0] // max(len(flat), 1)
        rows = [i for i in flat for _ in range(group)]
        ids = rollouts.token_lists()
        texts = self.texts(ids)
        columns = {name: [values[i] for i in rows] for name, values in prompts.columns.items()}
        columns["completion_ids"] = ids
        given = [prompts.prompts[i] for i in rows]
        return torch.tensor([reward(given, texts, columns) for reward in self.rewards], dtype=torch.float32).T

    def texts(self, ids: list[list[int]]) -> list[str]:
        """The text of completions (token lists; special tokens, the end token among them, left out)."""
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def _batch(self, model: Any, rollouts: Rollouts, rows: slice, advantages: torch.Tensor) -> dict[str, Any]:
        """A training micro-batch of these rollout rows, with what the loss needs besides the policy."""
        batch: dict[str, Any] = {**rollouts.batch(rows), "advantages": advantages.to(rollouts.prompt_ids.device)}
        temperature = self.sampling.temperature
        if self.iterations > 1:
            batch["old_logps"] = gl.completion_logps(model, batch, temperature)[0]
        if self.settings.beta != 0.0:
            with disable_adapters(self.base):
                batch["ref_logps"] = gl.completion_logps(model, batch, temperature)[0]
        batch["count"] = gl.count(batch["completion_mask"], self.settings)
        return batch

    def loss(self, model: Any, batch: dict[str, Any], loss_path: str) -> torch.Tensor:
        logps, entropy = gl.completion_logps(model, batch, self.sampling.temperature, entropy=True)
        losses = gl.token_losses(logps, batch.get("old_logps"), batch.get("ref_logps"), batch["advantages"],
                                 batch["completion_mask"], self.settings)
        total, _ = gl.reduce(losses, self.settings)
        mask = losses.mask
        assert entropy is not None
        found = {"tokens": mask.sum(), "entropy": (entropy * mask).sum(), **gl.clip_fractions(losses, self.settings)}
        if losses.kl is not None:
            found["kl"] = (losses.kl * mask).sum()
        self._add(found)
        return total

    def count(self, batch: dict[str, Any]) -> int:
        return int(batch["count"])

    def state_dict(self) -> dict[str, Any]:
        """The sampler's generator, and the batches still to be reused with the count of reuses left."""
        return {"generator": self.generator.get_state(), "reuse": self.reuse, "kept": self.kept if self.reuse else []}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.generator.set_state(state["generator"])
        self.reuse = int(state["reuse"])
        self.kept = [{k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                     for batch in state["kept"]]

    # -- statistics -----------------------------------------------------------------------------------------
    def _add(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def _add_rollout_stats(self, per_function: torch.Tensor, total: torch.Tensor, zero_std: torch.Tensor,
                           rollouts: Rollouts) -> None:
        values: dict[str, Any] = {"completions": len(total), "reward": total.sum(), "reward_sq": (total ** 2).sum(),
                                  "zero_std": zero_std.float().sum(), "length": rollouts.completion_mask.sum(),
                                  "rollout_s": rollouts.seconds}
        for reward, column in zip(self.rewards, per_function.T, strict=True):
            values[f"rewards/{reward.name}/sum"] = column.sum()
            values[f"rewards/{reward.name}/sq"] = (column ** 2).sum()
        self._add(values)

    def stats(self, accelerator: Any = None) -> dict[str, float]:
        keys = sorted(self.sums)
        totals = torch.tensor([self.sums[k] for k in keys], dtype=torch.float64)
        processes = accelerator.num_processes if accelerator is not None else 1
        if processes > 1:
            totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum").cpu()
        t = dict(zip(keys, totals.tolist(), strict=True))
        self.sums = {}
        out = {"update_s": time.perf_counter() - self.sampled_at}
        n, tokens = max(t.get("completions", 0.0), 1.0), max(t.get("tokens", 0.0), 1.0)
        if "completions" in t:
            out.update({"reward": t["reward"] / n, "reward_std": _std(t["reward"], t["reward_sq"], n),
                        "frac_reward_zero_std": t["zero_std"] / n, "completions/mean_length": t["length"] / n,
                        "rollout_s": t["rollout_s"] / processes})
            for reward in self.rewards:
                s, sq = t[f"rewards/{reward.name}/sum"], t[f"rewards/{reward.name}/sq"]
                out[f"rewards/{reward.name}/mean"], out[f"rewards/{reward.name}/std"] = s / n, _std(s, sq, n)
        for key in ("entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            if key in t:
                out[key] = t[key] / tokens
        return out

    # -- the held-out score ---------------------------------------------------------------------------------
    def evaluate(self, model: Any, loss_path: str) -> dict[str, Any]:
        """Mean reward of greedy completions of the held-out prompts, per function and weighted, and exact match
        of the same completions cut to exact match's answer length (when every held-out row has a reference)."""
        held = self.held
        assert held is not None, "run.py evaluates only a run with an eval split"
        completion = self.sampling.max_completion_length
        references = held.references if len(held.references) == len(held) else []
        answer = answer_tokens(self.tokenizer, [ref for _, ref in references]) if references else 0
        greedy = Sampling(1, max(completion, answer), 0.0, 1.0, self.sampling.merge)
        scores, lengths, answers = [], 0, []
        for start in range(0, len(held), EVAL_PROMPTS):
            flat = list(range(start, min(start + EVAL_PROMPTS, len(held))))
            rollouts = sample(self.base, [held.prompt_ids[i] for i in flat], greedy, self.tokenizer.pad_token_id,
                              self.ends)
            scored = rollouts.first(completion)  # greedy: the first tokens are those of a shorter generation
            scores.append(self.score(held, flat, scored))
            lengths += int(scored.completion_mask.sum())
            answers += self.texts(rollouts.first(answer).token_lists()) if references else []
        per_function = torch.cat(scores)
        weights = torch.tensor([r.weight for r in self.rewards], dtype=torch.float32)
        result: dict[str, Any] = {"reward": float((per_function * weights).sum(1).mean()), "n": len(held),
                                  "completions/mean_length": lengths / len(held)}
        result.update({f"rewards/{r.name}/mean": float(c.mean()) for r, c in zip(self.rewards, per_function.T,
                                                                                   strict=True)})
        return {**result, **match_result(answers, references)} if references else result

    def describe(self, result: dict[str, Any]) -> str:
        each = ", ".join(f"{r.name} {result[f'rewards/{r.name}/mean']:.3f}" for r in self.rewards)
        return (f"reward {result['reward']:.3f} ({each}) of {result['n']} greedy completions, mean length "
                f"{result['completions/mean_length']:.1f} tokens{exact_match_text(result)}")


def _std(total: float, squares: float, n: float) -> float:
    """The unbiased std from a sum and a sum of squares of n values."""
    return (max(squares - total * total / n, 0.0) / (n - 1)) ** 0.5 if n > 1 else 0.0


def start_run(session: Session, max_completion_length: int, specs: list[str]) -> GrpoRun:
    """The run of `session` (grpo.Grpo.start)."""
    s, options = session, session.cfg.objective_options
    train, held = s.train_split, s.eval_split
    assert isinstance(train, Prompts) and (held is None or isinstance(held, Prompts))
    sampling = Sampling(options["num_generations"], max_completion_length, options["temperature"], options["top_p"],
                        options["rollout_merge"])
    settings = gl.LossSettings(options["loss_type"], options["epsilon"], options["epsilon_high"], options["beta"],
                               max_completion_length, options["use_bias_correction_kl"])
    rewards = build(specs, options["reward_pattern"], max_completion_length)
    seed = s.cfg.seed + s.accelerator.process_index
    run = GrpoRun(train, held, s.tokenizer, s.model, sampling, settings, rewards, options["scale_rewards"],
                  options["num_iterations"], seed, s.accelerator.device)
    if options["use_vllm"]:
        from peftkit.train.objectives.vllm_rollouts import connect

        run.sampler = connect(session, options)
    return run
