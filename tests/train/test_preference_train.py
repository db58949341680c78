"""Preference training end to end on a tiny Llama: it raises held-out preference accuracy, logs the statistics,
works with every adapter method and with a full fine-tune (precomputed reference), resumes exactly, and refuses
what cannot work with one line."""

from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file

from peftkit.errors import PeftkitError
from peftkit.train.checkpoints.rundir import RunDir
from peftkit.train.config import load_train_config, read_recipe, resolve_defaults
from peftkit.train.run import train
from tests.tiny import save_tiny_checkpoint

GOOD = ["alpha", "beta", "gamma", "delta"]
BAD = ["wrong", "nope", "error", "never"]


def _write_pairs(path, n: int, offset: int = 0):
    """A task a tiny model learns in a few steps: the chosen answer is always a GOOD word, the rejected a BAD one."""
    with path.open("w") as f:
        for i in range(offset, offset + n):
            f.write(json.dumps({"prompt": f"Answer number {i}?", "chosen": GOOD[i % 4],
                                "rejected": BAD[(i * 3) % 4]}) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref-train")
    return root, save_tiny_checkpoint(root / "tiny"), _write_pairs(root / "train.jsonl", 32), \
        _write_pairs(root / "eval.jsonl", 8, offset=100)


def _options(setup, output, **extra):
    root, model, data, held = setup
    return {**dict(model=str(model), data=str(data), eval_data=str(held), max_steps=6, batch_size=4, max_length=64,
                   lr=3e-2, rank=4, dropout=0.0, precision="fp32", seed=0, warmup=0, output=str(root / output),
                   eval_examples=8), **extra}


def _records(run_dir, kind):
    return [r for r in map(json.loads, RunDir(run_dir).metrics.read_text().splitlines()) if r["kind"] == kind]


@pytest.mark.parametrize("objective, beta", [("dpo", None), ("orpo", 1.0), ("simpo", None)])
def test_training_raises_held_out_preference_accuracy(setup, objective, beta):
    # ORPO's default lambda 0.1 leaves it to the NLL term, which this tiny model (vocab 49k) learns slowly
    options = _options(setup, objective, objective=objective, beta=beta)
    result = train(load_train_config(None, options), progress=False)
    before, after = result.before, result.after
    assert after["preference_accuracy"] > before["preference_accuracy"]
    assert after["preference_accuracy"] >= 0.75 and after["rewards/margins"] > before["rewards/margins"]
    steps = _records(result.run_dir, "train")
    assert [r["step"] for r in steps] == list(range(1, 7))
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert all(math.isfinite(r[key]) for r in steps), key
    assert steps[0]["pairs"] == 4
    if objective == "dpo":  # the LoRA adapter starts as the identity: policy = reference
        assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert before["loss"] == pytest.approx(math.log(2), abs=1e-6) and before["rewards/accuracies"] == 0.0


@pytest.mark.parametrize("method, options", [("adapter", {}), ("prefix", {"num_virtual_tokens": 4}),
                                             ("prompt", {"num_virtual_tokens": 4})])
def test_every_adapter_method_trains_with_dpo(setup, method, options):
    opts = {**_options(setup, f"dpo-{method}", objective="dpo", method=method, max_steps=2, lr=1e-2), **options}
    opts.pop("rank"), opts.pop("dropout")
    result = train(load_train_config(None, opts), progress=False)
    steps = _records(result.run_dir, "train")
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    assert result.after["rewards/margins"] != result.before["rewards/margins"]  # the adapter moved the policy
    assert (result.saved / "adapter_model.safetensors").is_file()


def test_full_fine_tune_needs_and_uses_a_precomputed_reference(setup):
    with pytest.raises(PeftkitError, match="DPO with --method full needs --precompute-ref"):
        load_train_config(None, {"method": "full", "objective": "dpo"})
    opts = _options(setup, "dpo-full", objective="dpo", method="full", precompute_ref=True, max_steps=1, lr=1e-4)
    opts.pop("rank"), opts.pop("dropout")
    result = train(load_train_config(None, opts), progress=False)
    assert _records(result.run_dir, "train")[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert result.after["loss"] < math.log(2)


def test_resume_equals_an_uninterrupted_run(setup):
    straight = train(load_train_config(None, _options(setup, "straight", objective="dpo")), progress=False)

    def stop(step):
        if step == 3:
            raise KeyboardInterrupt

    interrupted = _options(setup, "interrupted", objective="dpo", save_steps=3)
    with pytest.raises(KeyboardInterrupt):
        train(load_train_config(None, interrupted), progress=False, on_checkpoint=stop)
    resumed = train(load_train_config(None, {**interrupted, "resume": True}), progress=False)
    want = load_file(str(straight.saved / "adapter_model.safetensors"))
    got = load_file(str(resumed.saved / "adapter_model.safetensors"))
    assert max(float((want[k] - got[k]).abs().max()) for k in want) <= 1e-6
    assert [r["step"] for r in _records(resumed.run_dir, "train")] == list(range(1, 7))


@pytest.mark.parametrize("options, message", [
    ({"objective": "dpo", "packing": True}, "--packing does not work with --objective dpo"),
    ({"objective": "ipo"}, "objective must be one of sft, dpo, orpo, simpo, kto, grpo; got 'ipo'"),
    ({"beta": 0.2}, "--beta is an option of dpo, grpo, kto, orpo, simpo; add --objective dpo"),
    ({"objective": "dpo", "simpo_gamma": 0.5}, "--simpo-gamma is an option of simpo; add --objective simpo"),
    ({"objective": "orpo", "precompute_ref": True}, "--precompute-ref is an option of dpo, kto; add --objective dpo"),
    ({"objective": "dpo", "beta": 0}, "beta must be > 0"),
    ({"objective": "simpo", "train_on_prompt": True}, "--train-on-prompt and --format are SFT options"),
])
def test_refusals(options, message):
    with pytest.raises(PeftkitError, match=message):
        load_train_config(None, options)


def test_data_of_the_wrong_kind_is_refused(setup, tmp_path):
    root, model, data, held = setup
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n")
    with pytest.raises(PeftkitError, match="needs preference rows"):
        train(load_train_config(None, {"model": str(model), "data": str(sft), "objective": "dpo",
                                       "output": str(tmp_path / "a")}), progress=False)
    with pytest.raises(PeftkitError, match="train on them with --objective dpo, orpo or simpo"):
        train(load_train_config(None, {"model": str(model), "data": str(data), "output": str(tmp_path / "b")}),
              progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_defaults_and_other_tools_recipe_keys(tmp_path):
    recipe = tmp_path / "lf.yaml"
    recipe.write_text("pref_loss: sigmoid\npref_beta: 0.2\nprecompute_ref_log_probs: true\n")
    assert read_recipe(recipe) == {"objective": "dpo", "beta": 0.2, "precompute_ref": True}
    assert load_train_config(recipe).objective_options == {"beta": 0.2, "precompute_ref": True}
    simpo = resolve_defaults(load_train_config(None, {"objective": "simpo"})).objective_options
    assert (simpo["beta"], simpo["simpo_gamma"]) == (2.0, 1.0)
    assert resolve_defaults(load_train_config(None, {"objective": "dpo"})).objective_options["beta"] == 0.1
    assert resolve_defaults(load_train_config(None, {})).objective_options == {}
    bundled = resolve_defaults(load_train_config(None, {"objective": "dpo"}))
    assert (bundled.max_steps, bundled.batch_size, bundled.lr, bundled.max_length) == (20, 4, 2e-3, 128)
    assert resolve_defaults(load_train_config(None, {"objective": "dpo", "epochs": 2})).max_steps is None
    assert resolve_defaults(load_train_config(None, {"objective": "dpo", "data": "x.jsonl"})).max_steps is None
