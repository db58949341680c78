"""GRPO's held-out score derives exact match from the reward's greedy completions: the same figure as exact match's
own generation (evaluation/heldout.exact_match), row by row, with one generation instead of two."""

from __future__ import annotations

from transformers import AutoModelForCausalLM, AutoTokenizer

from peftkit.data.prompting import default_prompt_format, render_prompt
from peftkit.train.evaluation.heldout import exact_match
from peftkit.train.objectives.grpo_loss import LossSettings
from peftkit.train.objectives.grpo_prompts import Prompts
from peftkit.train.objectives.grpo_run import GrpoRun
from peftkit.train.objectives.rewards import DEFAULT_PATTERN, build
from peftkit.train.objectives.rollouts import Sampling
from tests.train.sharded_grpo import _ending_model


def test_exact_match_from_the_scored_completions_equals_exact_match(tmp_path):
    folder = _ending_model(tmp_path / "tiny")  # greedy ends at once: the empty answer is right, "x" is not
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    fmt = default_prompt_format(tokenizer)
    prompts = [[{"role": "user", "content": f"Say {i}."}] for i in range(4)]
    answers = ["", "x", "", "x"]
    ids = tokenizer([render_prompt(tokenizer, p, fmt) for p in prompts], add_special_tokens=False)["input_ids"]
    held = Prompts(prompts, ids, {"answer": answers}, list(zip(prompts, answers, strict=True)))
    run = GrpoRun(held, held, tokenizer, model, Sampling(2, 4), LossSettings(max_completion_length=4),
                  build(["exact_match"], DEFAULT_PATTERN, 4), "group", 1, 0, "cpu")
    got = run.evaluate(model, "fused")
    want = exact_match(model, tokenizer, held.references, fmt)
    assert got["exact_match"] == want["exact_match"] == got["rewards/exact_match/mean"] == 0.5
    assert [s["answer"] for s in got["samples"]] == [s["answer"] for s in want["samples"]] == ["", "", ""]
    held.references.pop()  # a row without a reference: exact match is left to the run (run.py)
    assert "exact_match" not in run.evaluate(model, "fused")
