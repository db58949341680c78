"""Resume continues exactly: a run SIGKILLed right after a checkpoint, then resumed, ends with the same weights
as the same run left alone (fp32 CPU, tiny Llama, LoRA with dropout so the restored RNG state matters too)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file

from peftkit.train.checkpoints.rundir import RunDir
from peftkit.train.config import load_train_config
from peftkit.train.run import train
from tests.tiny import save_tiny_checkpoint, write_rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = save_tiny_checkpoint(root / "tiny")
    write_rows(root / "train.jsonl", 20)
    write_rows(root / "eval.jsonl", 3, offset=50)
    return root, model


def _options(root, model, output):
    return dict(model=str(model), data=str(root / "train.jsonl"), eval_data=str(root / "eval.jsonl"), max_steps=8,
                batch_size=3, max_length=64, lr=2e-2, warmup=2, scheduler="cosine", dropout=0.1, rank=4,
                precision="fp32", save_steps=3, eval_steps=4, seed=7, output=str(output), eval_examples=2)


def test_sigkill_then_resume_equals_uninterrupted(setup):
    root, model = setup
    straight = train(load_train_config(None, _options(root, model, root / "straight")), progress=False)
    assert straight.steps == 8

    killed = root / "killed"
    script = textwrap.dedent(f"""
        import os, signal
        from peftkit.train.config import load_train_config
        from peftkit.train.run import train
        def die(step):
            if step == 6:
                os.kill(os.getpid(), signal.SIGKILL)
        train(load_train_config(None, {_options(root, model, killed)!r}), progress=False, on_checkpoint=die)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ.copy())
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [p.name for p in RunDir(killed).checkpoints()] == ["step-000003", "step-000006"]
    assert not (killed / "adapter").exists()

    resumed = train(load_train_config(None, {**_options(root, model, killed), "resume": True}), progress=False)
    assert resumed.steps == 8
    want = load_file(str(straight.saved / "adapter_model.safetensors"))
    got = load_file(str(resumed.saved / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    moved = max(float(t.abs().max()) for k, t in want.items() if "lora_B" in k)
    assert moved > 1e-3  # the adapter trained, so equal weights mean something
    for key in want:
        assert (want[key] - got[key]).abs().max() <= 1e-6, key
    steps = [r["step"] for r in resumed_metrics(killed) if r["kind"] == "train"]
    assert steps == list(range(1, 9))  # the steps after the checkpoint were dropped and redone once
    evals = [r["step"] for r in resumed_metrics(killed) if r["kind"] == "eval"]
    assert evals == [0, 4, 8]  # before, --eval-steps 4, after


def resumed_metrics(run_dir):
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
