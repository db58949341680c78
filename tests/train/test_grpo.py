"""GRPO: the reward functions and their checks, rollouts (greedy = HF generate, the merged adapter restored
exactly, top-p), the prompt rows and their refusals, and a two-step run on a tiny model logging TRL's metrics
(under FSDP: test_fsdp.py; resumed: test_grpo_resume.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.errors import PeftkitError
from peftkit.methods.lora.config import LoraConfig
from peftkit.train.config import load_train_config, resolve_defaults
from peftkit.train.objectives import rewards
from peftkit.train.objectives.rollouts import Sampling, pick, sample
from peftkit.train.reporting import memory_report
from peftkit.train.run import train
from tests.tiny import greedy_generate, perturb_adapter, save_tiny_checkpoint, tiny_model

ANSWER = "name=Ana Ruiz; city=Lima; date=2020-01-02"


def test_builtin_rewards():
    completions = [ANSWER, "name=Ana Ruiz; city=Lima; date=2020-01-03", "Ana Ruiz was in Lima", "no"]
    answers = [ANSWER] * 4
    assert rewards.exact_match([], completions, answer=answers) == [1.0, 0.0, 0.0, 0.0]
    assert rewards.fields([], completions, answer=answers) == [1.0, 2 / 3, 0.0, 0.0]  # a value out of its slot: 0
    echo = "Ana Ruiz moved to Lima on Jan 2, 2020."  # echoing the input sentence pays nothing
    assert rewards.fields([], [echo, "name=Ana Ruiz; Lima"], answer=[ANSWER] * 2) == [0.0, 1 / 3]
    assert rewards.format_reward(rewards.DEFAULT_PATTERN)([], completions) == [1.0, 1.0, 0.0, 0.0]
    assert rewards.length_penalty(8)([], completions, completion_ids=[[1] * 8, [1] * 2, [], [1]]) == \
        [-1.0, -0.25, 0.0, -0.125]
    assert rewards.parse("fields:0.5") == ("fields", 0.5) and rewards.parse("mod:fn") == ("mod:fn", 1.0)
    assert rewards.parse("mod:fn:2") == ("mod:fn", 2.0)


def test_bundled_prompts_show_one_training_row():
    from transformers import AutoTokenizer

    from peftkit.data.prompting import default_prompt_format
    from peftkit.io.models import embedded_folder
    from peftkit.train.splits import load_splits

    tokenizer = AutoTokenizer.from_pretrained(embedded_folder())
    cfg = resolve_defaults(load_train_config(None, {"objective": "grpo"}))
    train_split, held, _ = load_splits(cfg, tokenizer, default_prompt_format(tokenizer))
    shot = json.loads(Path(peftkit.data.BUNDLED_TRAIN).read_text(encoding="utf-8").splitlines()[0])
    evals = [json.loads(line) for line in Path(peftkit.data.BUNDLED_EVAL).read_text(encoding="utf-8").splitlines()]
    assert len(train_split) == 1499 and shot["output"] not in train_split.columns["answer"]  # not trained on
    assert held.columns["answer"] == [row["output"] for row in evals]
    for prompts in (train_split.prompts, held.prompts):
        assert all([m["role"] for m in p] == ["user", "assistant", "user"] and p[1]["content"] == shot["output"]
                   for p in prompts)
    assert held.prompts[0][2]["content"].endswith(evals[0]["input"]) and len(held.references) == 50


def test_user_reward_function_and_its_errors(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def short(prompts, completions, answer, **kw):\n    return [1.0 / (1 + len(c)) for c in completions]\n"
        "def broken(prompts, completions, **kw):\n    raise ValueError('boom')\n"
        "def nan(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n"
        "def few(prompts, completions, **kw):\n    return [1.0]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    short, broken, nan, few = rewards.build(["my_rewards:short:2", "my_rewards:broken", f"{tmp_path}/my_rewards.py:nan",
                                             "my_rewards:few"], rewards.DEFAULT_PATTERN, 8)
    assert short.weight == 2.0 and short(["p", "p"], ["a", "abc"], {"answer": ["x", "x"]}) == [0.5, 0.25]
    for reward, message in [(broken, "the reward 'my_rewards:broken' raised ValueError: boom"),
                            (nan, "returned nan for completion 0; return a finite float"),
                            (few, "returned 1 values for 2 completions")]:
        with pytest.raises(PeftkitError, match=message):
            reward(["p", "p"], ["a", "b"], {})
    model = save_tiny_checkpoint(tmp_path / "tiny")  # inside a run: the same one line, before any update
    options = dict(model=str(model), data=str(_rows(tmp_path / "t.jsonl", 4)), eval_split=0, objective="grpo",
                   reward="my_rewards:few", num_generations=2, max_completion_length=2, max_steps=1, batch_size=2,
                   max_length=48, precision="fp32", output=str(tmp_path / "run"))
    with pytest.raises(PeftkitError, match="returned 1 values for 4 completions"):
        train(load_train_config(None, options), progress=False)
    for spec, message in [("nope", "not a built-in reward"), ("no_such_module:f", "could not import"),
                          ("my_rewards:missing", "has no function 'missing'")]:
        with pytest.raises(PeftkitError, match=message):
            rewards.build([spec], rewards.DEFAULT_PATTERN, 8)


def test_rollouts_greedy_equal_generate_and_restore_the_weights():
    model = tiny_model("llama")
    peftkit.inject(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb_adapter(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = [[5] * 18 + [7, 8, 9], [5] * 18 + [11, 12], [5] * 18 + [3, 4, 5, 6]]
    out = sample(model, prompts, Sampling(num_generations=2, max_completion_length=6, temperature=0), 0, [1])
    for i, prompt in enumerate(prompts):
        want = greedy_generate(model, torch.tensor([prompt]), 6)[0]
        assert torch.equal(out.completion_ids[2 * i], want) and torch.equal(out.completion_ids[2 * i + 1], want)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # merged and restored exactly
    end = int(out.completion_ids[0, 2])
    ended = sample(model, prompts, Sampling(2, 6, 0.0), 0, [end])
    first = out.completion_ids[0].tolist().index(end)  # the mask keeps the first end token, pads after it
    assert ended.completion_mask[0].tolist()[:first + 2] == [1] * (first + 1) + [0][:ended.completion_ids.shape[1] - first - 1]
    assert ended.completion_ids[0, first + 1:].eq(0).all()


def test_top_p_keeps_the_nucleus_as_hf():
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    hf = TopPLogitsWarper(0.7)(None, logits.clone()).isfinite()
    g = torch.Generator().manual_seed(1)
    seen = torch.zeros_like(hf)
    for _ in range(300):
        seen[torch.arange(4), pick(logits, 1.0, 0.7, g)] = True
    assert (seen & ~hf).sum() == 0 and seen.sum() > 4  # samples only from HF's nucleus, more than the argmax


def _rows(path, n, offset=0):
    with path.open("w") as f:
        for i in range(offset, offset + n):
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"Say {i % 3}."}], "answer": str(i % 3)}) + "\n")
    return path


def test_prompt_rows_and_refusals(tmp_path):
    model = save_tiny_checkpoint(tmp_path / "tiny")
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "Say 1.", "topic": "x"}) + "\n")
    base = dict(model=str(model), objective="grpo", output=str(tmp_path / "run"), dry_run=True)
    for options, message in [({"data": str(plain)}, "--objective grpo needs --reward"),
                             ({"data": str(plain), "reward": "exact_match"}, "compares completions with an `answer` column; the training data has none"),
                             ({"data": str(_rows(tmp_path / "r.jsonl", 4)), "reward": "fields", "max_length": 20,
                               "max_completion_length": 32},
                              "prompt of row 0 has .* tokens, and with --max-completion-length 32 more it exceeds --max-length 20")]:
        with pytest.raises(PeftkitError, match=message):
            train(load_train_config(None, {**base, **options}), progress=False)
    with pytest.raises(PeftkitError, match="--num-generations is an option of grpo"):
        load_train_config(None, {"num_generations": 4})
    cfg = resolve_defaults(load_train_config(None, {"objective": "grpo", "num_generations": 6, "beta": 0}))
    assert cfg.objective_options["beta"] == 0.0 and cfg.objective_options["loss_type"] == "dapo"
    assert (cfg.batch_size, cfg.max_steps) == (4, 20) and memory_report._rows(cfg) == 4 * 6  # the memory report: G rows a prompt


def test_two_steps_on_a_tiny_model_log_the_metrics(tmp_path, monkeypatch):
    model = save_tiny_checkpoint(tmp_path / "tiny")
    (tmp_path / "mine.py").write_text("def digit(prompts, completions, answer, **kw):\n"
                                      "    return [float(any(ch.isdigit() for ch in c)) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    options = dict(model=str(model), data=str(_rows(tmp_path / "t.jsonl", 8)), eval_data=str(_rows(tmp_path / "e.jsonl", 3)),
                   objective="grpo", reward="exact_match,mine:digit:0.5", num_generations=3, max_completion_length=4,
                   max_steps=2, batch_size=2, max_length=64, lr=1e-2, precision="fp32", beta=0.1, num_iterations=2,
                   output=str(tmp_path / "run"), seed=0)
    result = train(load_train_config(None, options), progress=False)
    assert set(result.after) >= {"reward", "rewards/exact_match/mean", "rewards/mine:digit/mean", "exact_match"}
    records = [json.loads(line) for line in result.run_dir.metrics.read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in steps] == [1, 2]
    assert "rollout_s" in steps[0] and "rollout_s" not in steps[1]  # the second step reuses the first's rollouts
    for key in ("loss", "kl", "entropy", "clip_ratio/region_mean", "update_s"):
        assert all(math.isfinite(r[key]) for r in steps), key
    assert steps[0]["completions/mean_length"] <= 4 and "rewards/mine:digit/std" in steps[0]


def test_one_step_over_a_4bit_base_and_deepspeed_refused(tmp_path):
    model = save_tiny_checkpoint(tmp_path / "tiny")
    options = dict(model=str(model), data=str(_rows(tmp_path / "t.jsonl", 4)), eval_split=0, objective="grpo",
                   reward="exact_match", num_generations=2, max_completion_length=3, max_steps=1, batch_size=2,
                   max_length=48, lr=1e-2, precision="fp32", beta=0.1, method="qlora", rank=2,
                   output=str(tmp_path / "run"), seed=0)
    result = train(load_train_config(None, options), progress=False)  # sampled unmerged: a 4-bit base
    step = [json.loads(line) for line in result.run_dir.metrics.read_text().splitlines() if '"train"' in line][0]
    assert math.isfinite(step["loss"]) and math.isfinite(step["kl"])
    ds_config = tmp_path / "ds.json"  # the presets run (test_grpo_deepspeed.py); a JSON config has not
    ds_config.write_text('{"zero_optimization": {"stage": 2}}')
    with pytest.raises(PeftkitError, match="--objective grpo under --deepspeed is not verified yet with a DeepSpeed"):
        train(load_train_config(None, {**options, "deepspeed": str(ds_config), "method": "lora", "dry_run": True}),
              progress=False)
