"""The GRPO run the sharded tests launch (tests/train/test_fsdp.py under FSDP2, test_grpo_deepspeed.py under ZeRO-3,
two CPU processes): two steps finish, log GRPO's metrics and save a whole adapter.

The tiny model is made to end its completions early and at random (its end token gets a large logit offset: a
constant first embedding dimension feeds it), so the two processes, sampling different prompts with different
seeds, end their token-by-token loops at different steps: every sharded forward is a collective, so the loops
must stop together (rollouts._all_done), or the launch hangs until its timeout. The reference pass (beta > 0)
and the held-out evaluation, on every process, run under FSDP too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.tiny import save_tiny_checkpoint
from tests.train.test_grpo import _rows

END_OFFSET = 2.9  # measured: without the stop together, this launch hangs (the loops end at different steps)


def _ending_model(folder):
    """A tiny checkpoint whose end token is likely after every token."""
    save_tiny_checkpoint(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    end = AutoTokenizer.from_pretrained(folder).eos_token_id
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight  # tied: the output head too
        embedding[:, 0] = 1.0
        embedding[end, 0] = END_OFFSET
    model.save_pretrained(folder)
    return folder


def grpo_options(tmp_path):
    """The two-step GRPO run the sharded tests launch (the model that ends early, the KL term, an eval split)."""
    return dict(model=str(_ending_model(tmp_path / "tiny")), data=str(_rows(tmp_path / "t.jsonl", 8)),
                eval_data=str(_rows(tmp_path / "e.jsonl", 2)), objective="grpo", reward="length,exact_match",
                num_generations=2, max_completion_length=8, max_steps=2, batch_size=2, max_length=64, lr=1e-2,
                precision="fp32", beta=0.1, seed=0, output=str(tmp_path / "run"))


def check_two_steps(options, keys=()):
    """Both steps logged GRPO's metrics (and `keys`), both evaluations exact match, and PEFT loads the adapter."""
    from peft import PeftModel

    run = Path(options["output"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("loss", "reward", "rewards/length/mean", "kl", "entropy", "completions/mean_length", *keys):
        assert all(isinstance(r[key], float) for r in steps), key
    assert {r["step"] for r in records if r["kind"] == "eval" and "exact_match" in r} == {0, 2}
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(options["model"]), str(run / "adapter"))
    assert peft.peft_config["default"].r > 0
