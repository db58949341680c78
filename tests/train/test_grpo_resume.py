"""GRPO and `--resume`: a run interrupted after a checkpoint and resumed equals the uninterrupted run, which needs
the checkpoint to hold the sampler's generator (the next rollouts) and, with num_iterations > 1, the rollouts still
to be reused (ObjectiveRun.state_dict)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from peftkit.train.config import load_train_config
from peftkit.train.run import train
from tests.tiny import save_tiny_checkpoint
from tests.train.test_grpo import _rows


def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    (tmp_path / "ids_reward.py").write_text("def first(prompts, completions, completion_ids, **kw):\n"
                                            "    return [float(ids[0] % 5) if ids else 0.0 for ids in completion_ids]\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # a reward that varies within a group: the adapter learns
    model = save_tiny_checkpoint(tmp_path / "tiny")
    options = dict(model=str(model), data=str(_rows(tmp_path / "t.jsonl", 8)), eval_split=0, objective="grpo",
                   reward="ids_reward:first", num_generations=3, max_completion_length=3, max_steps=3, batch_size=2,
                   max_length=48, lr=1e-2, precision="fp32", num_iterations=2, seed=0, save_steps=1)
    straight = train(load_train_config(None, {**options, "output": str(tmp_path / "straight")}), progress=False)

    def stop(step):
        if step == 1:  # step 2 reuses step 1's rollouts; step 3 samples with the generator as step 1 left it
            raise KeyboardInterrupt

    interrupted = {**options, "output": str(tmp_path / "interrupted")}
    with pytest.raises(KeyboardInterrupt):
        train(load_train_config(None, interrupted), progress=False, on_checkpoint=stop)
    assert (tmp_path / "interrupted" / "checkpoints" / "step-000001" / "objective.json").is_file()
    resumed = train(load_train_config(None, {**interrupted, "resume": True}), progress=False)
    want = load_file(str(straight.saved / "adapter_model.safetensors"))
    got = load_file(str(resumed.saved / "adapter_model.safetensors"))
    assert max(float(t.abs().max()) for k, t in want.items() if "lora_B" in k) > 1e-3  # it trained
    assert max(float((want[k] - got[k]).abs().max()) for k in want) <= 1e-6
    records = [json.loads(line) for line in resumed.run_dir.metrics.read_text().splitlines()]
    assert [("rollout_s" in r) for r in records if r["kind"] == "train"] == [True, False, True]


def test_objective_state_files(tmp_path):
    """Each process's state round-trips; a checkpoint of fewer processes, or a broken file, is one line."""
    import torch

    from peftkit.errors import PeftkitError
    from peftkit.train.checkpoints.objective import load_objective, save_objective

    states = [{"generator": torch.arange(4, dtype=torch.uint8), "reuse": 1, "kept": [{"count": 3}]}, {"reuse": 0}]
    save_objective(tmp_path, states)
    got = load_objective(tmp_path, 0)
    assert torch.equal(got["generator"], states[0]["generator"]) and got["kept"] == [{"count": 3}]
    assert load_objective(tmp_path, 1) == {"reuse": 0}
    with pytest.raises(PeftkitError, match="written by 2 processes; resume with as many"):
        load_objective(tmp_path, 2)
    save_objective(tmp_path / "none", [{}, {}])  # no objective state: no file, nothing to load
    assert load_objective(tmp_path / "none", 0) == {}
    (tmp_path / "objective.json").write_text('{"format": 1, "state": {"g": {"__tensor__": "0.generator"}}}')
    with pytest.raises(PeftkitError, match="should hold a list of objective states"):
        load_objective(tmp_path, 0)
