"""`grpo` (Shao et al. 2024, DeepSeekMath): online RL with verifiable rewards on prompt rows, as TRL's GRPOTrainer.

Each step samples G completions of each of its prompts from the model as it trains (train/objectives/rollouts.py),
scores them with the reward functions (rewards.py: `--reward NAME[:weight]`, built-ins or a user's
`module:function` with TRL's signature), turns the rewards into group-normalised advantages and trains on the
clipped surrogate plus an optional KL term to the reference, the model with its adapter switched off
(grpo_loss.py). The options are TRL's GRPOConfig's names and defaults (beta 0, loss_type dapo, scale_rewards group,
epsilon 0.2, temperature 1, top_p 1), but the completion length and the group size, which default to what the
bundled task needs on a CPU.

Rows: `prompt` (a string, the user's turn, or a list of messages) or `messages` (the turns before the last
assistant turn are the prompt; that turn is the `answer` when the data has none) or alpaca rows (instruction /
input, the output as `answer`); every other column is passed to the reward functions, one value per completion.
With no --data: the bundled extraction task's prompts, each showing one worked example (a training row) as an
earlier chat turn, and answers, with the rewards `fields` and `exact_match`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.core.options import Option
from peftkit.errors import PeftkitError
from peftkit.train.objectives.base import Objective, ObjectiveRun, register_objective
from peftkit.train.objectives.pairs import refuse_sft_options

if TYPE_CHECKING:
    from peftkit.core.method import Method
    from peftkit.memory.generation import Rollout
    from peftkit.train.config import TrainConfig
    from peftkit.train.run import Session

BUNDLED_COMPLETION, GENERIC_COMPLETION = 32, 256
OPTIONS = (
    Option("reward", str, None, "GRPO: reward functions, NAME[:weight], several comma-separated or repeated: "
           "exact_match | fields | format | length (built-ins) or module:function (TRL's reward signature); "
           "default fields,exact_match on the bundled task.", multiple=True, aliases=("reward_funcs",)),
    Option("reward_pattern", str, r"name=[^;\n]+; city=[^;\n]+; date=\d{4}-\d{2}-\d{2}",
           "GRPO: the regular expression the `format` reward fully matches (default: the bundled task's answer)."),
    Option("num_generations", int, 4, "GRPO: completions sampled per prompt (TRL's default is 8).", low=2,
           high=1024),
    Option("max_completion_length", int, None, "GRPO: new tokens per completion (default 32 on the bundled task, "
           f"{GENERIC_COMPLETION} otherwise; also Dr. GRPO's constant).", low=1, high=1 << 20),
    Option("temperature", float, 1.0, "GRPO: sampling temperature (log-probs are scored at it, as in TRL).", low=0,
           high=100, low_open=True),
    Option("top_p", float, 1.0, "GRPO: nucleus sampling's probability mass.", low=0, high=1, low_open=True),
    Option("beta", float, 0.0, "GRPO: weight of the KL term to the reference (the adapter switched off); 0 as in "
           "TRL (no reference pass).", low=0, high=1e3),
    Option("epsilon", float, 0.2, "GRPO: the importance ratio's lower clip (1 - epsilon).", low=0, high=1),
    Option("epsilon_high", float, None, "GRPO: the ratio's upper clip (1 + epsilon_high; default epsilon; DAPO "
           "uses 0.28).", low=0, high=100),
    Option("loss_type", str, "dapo", "GRPO: the token losses' normalisation, TRL's: dapo (tokens of the step) | "
           "grpo (each completion's mean) | bnpo (tokens of each micro-batch) | dr_grpo (completions x "
           "max_completion_length).", choices=("dapo", "grpo", "bnpo", "dr_grpo")),
    Option("scale_rewards", str, "group", "GRPO: divide advantages by the reward std of the group | batch | none "
           "(Dr. GRPO).", choices=("group", "batch", "none")),
    Option("num_iterations", int, 1, "GRPO: optimizer steps on each batch of rollouts (TRL's mu).", low=1, high=64),
    Option("use_bias_correction_kl", bool, True, "GRPO: multiply the KL term by the importance ratio (TRL's "
           "default)."),
    Option("rollout_merge", bool, True, "GRPO: merge the adapter into the weights while sampling (exactly "
           "restored after; faster)."),
    Option("use_vllm", bool, False, "GRPO: sample the rollouts on a running vLLM server (`vllm serve BASE "
           "--enable-lora` with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; docs/training.md), the adapter loaded into it "
           "before each rollout batch; LoRA adapters only."),
    Option("vllm_server_base_url", str, None, "GRPO with --use-vllm: the server's address, http or https "
           "(default http://localhost:8000)."),
    Option("vllm_server_timeout", float, None, "GRPO with --use-vllm: seconds to wait for the server to answer, at "
           "the start (while it may still be loading) and for each request (default 240, as TRL).", low=0,
           high=86400, low_open=True),
    Option("vllm_adapter_dir", str, None, "GRPO with --use-vllm: the folder each rollout batch's adapter is "
           "written to, which the server must read at the same path (default RUN/vllm-adapters)."),
)
# The bundled task on a CPU: 20 steps of 4 prompts x 4 completions; lr for LoRA under RL (higher than TRL's 1e-6,
# which is for full fine-tuning; 2e-4 learned too slowly in 20-30 steps, docs/training.md); the one-shot prompts
# are about 170 tokens.
BUNDLED_DEFAULTS = {"max_steps": 20, "batch_size": 4, "lr": 1e-3, "max_length": 256}


def completion_length(cfg: TrainConfig) -> int:
    """max_completion_length, resolved (the bundled task's or the generic default when unset)."""
    given = cfg.objective_options.get("max_completion_length")
    return given or (BUNDLED_COMPLETION if cfg.data is None else GENERIC_COMPLETION)


def reward_specs(cfg: TrainConfig) -> list[str]:
    """The --reward values, one spec each (on the bundled task when none is given: `fields`, the share of
    fields in their slot, and `exact_match`, which pays for ending after the answer line)."""
    given = cfg.objective_options.get("reward")
    if not given:
        if cfg.data is not None:
            raise PeftkitError("--objective grpo needs --reward: a built-in (exact_match, fields, format, length) or "
                               "module:function returning one float per completion")
        return ["fields", "exact_match"]
    return [spec for spec in str(given).split(",") if spec.strip()]


class Grpo(Objective):
    """Group relative policy optimisation (see the module docstring)."""

    name = "grpo"
    options = OPTIONS
    needs_generation = True
    row_shape = "prompt rows (prompt, and columns for the rewards)"
    bundled_defaults = BUNDLED_DEFAULTS

    def rows(self, cfg: TrainConfig) -> int:
        """G completion rows (prompt + completion, up to --max-length) per prompt."""
        return int(cfg.objective_options.get("num_generations") or self.option_defaults()["num_generations"])

    def rollout(self, cfg: TrainConfig) -> Rollout:
        """The step's prompts (batch x grad_accum, sampled at once) x num_generations, the completion length; a
        reference pass when beta > 0 (the adapter switched off) or num_iterations > 1 (the old policy's
        log-probs); the adapter merged while sampling unless the weights are sharded (--fsdp, ZeRO-3), which
        rollouts.can_merge refuses at run time."""
        from peftkit.memory.generation import Rollout

        assert cfg.batch_size is not None, "a resolved config (resolve_defaults fills batch_size)"
        options = {**self.option_defaults(), **cfg.objective_options}
        sharded = bool(cfg.fsdp) or cfg.deepspeed == "zero3"
        return Rollout(cfg.batch_size * cfg.grad_accum, options["num_generations"], completion_length(cfg),
                       bool(options["beta"]) or options["num_iterations"] > 1, options["rollout_merge"] and not sharded)

    def bundled(self) -> tuple[str, str]:
        from peftkit import data

        return str(data.BUNDLED_TRAIN), str(data.BUNDLED_EVAL)

    def accepts(self, column_names: list[str]) -> bool:
        others = {"chosen", "rejected", "completion", "label"}
        return "prompt" in column_names and not others & set(column_names)

    def check(self, cfg: TrainConfig, method: Method) -> None:
        refuse_sft_options(cfg, self.name, "prompt rows")
        if cfg.deepspeed and cfg.deepspeed.endswith(".json"):  # the presets ran (tests/train/test_grpo_deepspeed.py)
            raise PeftkitError("--objective grpo under --deepspeed is not verified yet with a DeepSpeed JSON config "
                               "(offload and other settings have not run); use --deepspeed zero1|zero2|zero3, or --fsdp")
        options = cfg.objective_options
        if method.trains_base and options.get("beta"):
            raise PeftkitError(f"--beta with --method {method.name}: GRPO's reference is the adapter switched off, "
                               "and this method has none; use --beta 0 or an adapter method")
        from peftkit.train.objectives import rewards, vllm_rollouts

        sharding = "--fsdp" if cfg.fsdp else "--deepspeed" if cfg.deepspeed else None
        vllm_rollouts.check_options(options, method.trains_base, sharding)
        for spec in reward_specs(cfg):
            rewards.parse(spec)  # a malformed spec is reported before the model loads

    def load_splits(self, rows: Any, eval_rows: Any, tokenizer: Any, cfg: TrainConfig, prompt_format: dict) -> tuple:
        from peftkit.train.objectives import rewards

        specs = reward_specs(cfg)
        needs_answer = [s for s in specs if rewards.parse(s)[0] in rewards.NEEDS_ANSWER]
        from peftkit.train.objectives.grpo_prompts import one_shot, prompt_rows

        if cfg.data is None:  # the bundled task: one worked example (training row 0, not trained on) in each prompt
            shot = rows[0]
            rows = one_shot(rows.select(range(1, len(rows))), shot)
            eval_rows = one_shot(eval_rows, shot) if eval_rows is not None else None
        train = prompt_rows(rows, tokenizer, prompt_format, cfg.max_length, completion_length(cfg), "training")
        held = None
        if eval_rows is not None and len(eval_rows):
            eval_rows = eval_rows.select(range(min(len(eval_rows), cfg.eval_examples)))
            held = prompt_rows(eval_rows, tokenizer, prompt_format, cfg.max_length, completion_length(cfg),
                               "eval")
        for part, what in ((train, "training"), (held, "eval")):
            if part is not None and needs_answer and "answer" not in part.columns:
                others = ", ".join(sorted(part.columns)) or "none"
                raise PeftkitError(f"--reward {needs_answer[0]} compares completions with an `answer` column; the "
                                   f"{what} data has none (its columns besides the prompt: {others}); add one or "
                                   f"map it with --columns answer=YOUR_COLUMN")
        return train, held, f"prompt rows, rewards {', '.join(specs)}"

    def start(self, session: Session, loss_path: str) -> ObjectiveRun:
        from peftkit.train.objectives.grpo_run import start_run

        return start_run(session, completion_length(session.cfg), reward_specs(session.cfg))


register_objective(Grpo())
