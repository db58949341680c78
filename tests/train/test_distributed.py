"""Two CPU processes (torchrun, gloo) train the same adapter as one process with the same global batch.

1 process: micro-batches of 2, grad_accum 2 -> 4 examples per step. 2 processes: micro-batches of 2, grad_accum 1,
one micro-batch each -> the same 4 examples per step (process r takes every 2nd micro-batch of the same plan).
The loss is normalised by the target tokens of the whole step on both sides, so the updates are mathematically
equal. Tolerance 1e-5: the only differences are fp32 rounding (gradient sum order, the x world / world scaling,
gloo's all-reduce), ~1e-7 relative per step, which Adam's normalisation carries over to the update at most at lr
scale; after 4 steps at lr 1e-2 the observed difference is well below 1e-5.

The two-process run also reports to TensorBoard (--report-to): under torchrun only rank 0 writes tracker files.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from peftkit.train.config import load_train_config
from peftkit.train.run import train
from tests.tiny import save_tiny_checkpoint, write_rows
from tests.train.test_preference_train import _records, _write_pairs

REPO = Path(__file__).resolve().parents[2]
TENSORBOARD = importlib.util.find_spec("tensorboard") is not None  # a dev dependency


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DPO = dict(objective="dpo", max_steps=3, batch_size=2, max_length=64, lr=1e-2, rank=4, dropout=0.0, precision="fp32",
           seed=0, warmup=0, eval_split="0")


def _flags(options: dict) -> list[str]:
    """`peftkit train` flags for TrainConfig fields (True: a bare flag)."""
    out = []
    for key, value in options.items():
        out += [f"--{key.replace('_', '-')}"] if value is True else [f"--{key.replace('_', '-')}", str(value)]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process run, the torchrun launch's working folder and its output: one launch (~12 s of imports on
    this 2-core machine) serves every test of this module. It runs `peftkit train` twice in the same two processes
    (as several runs in one process are meant to work): the SFT run, which also reports to TensorBoard (under
    torchrun only rank 0 may write), then DPO (tiny pairs, test_preference_train.py) into the folder dpo-two/."""
    root = tmp_path_factory.mktemp("ddp")
    model = save_tiny_checkpoint(root / "tiny")
    write_rows(root / "train.jsonl", 16)
    _write_pairs(root / "pairs.jsonl", 32)
    common = dict(model=str(model), data=str(root / "train.jsonl"), eval_split="0", max_steps=4, batch_size=2,
                  max_length=64, lr=1e-2, rank=4, dropout=0.0, precision="fp32", seed=3)
    one = train(load_train_config(None, {**common, "grad_accum": 2, "output": str(root / "one")}), progress=False)

    launch = root / "launch"  # the launch's working folder: nothing but the SFT run folder may appear in it
    launch.mkdir()
    sft = ["train", *_flags({**common, "grad_accum": 1, "quiet": True, "output": launch / "two"}),
           *(["--report-to", "tensorboard"] if TENSORBOARD else [])]
    dpo = ["train", *_flags({**DPO, "model": model, "data": root / "pairs.jsonl", "grad_accum": 1,
                             "output": root / "dpo-two", "quiet": True})]
    script = root / "two_runs.py"
    script.write_text(f"from peftkit.cli import main\nfor argv in {[sft, dpo]!r}:\n    main(argv)\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=launch, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return one, launch, proc.stdout


def test_two_processes_equal_one(runs):
    one, launch, stdout = runs
    want = load_file(str(one.saved / "adapter_model.safetensors"))
    got = load_file(str(launch / "two" / "adapter" / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    assert max(float(t.abs().max()) for k, t in want.items() if "lora_B" in k) > 1e-3
    diff = max(float((want[k] - got[k]).abs().max()) for k in want)
    assert diff <= 1e-5, diff
    # Only rank 0 writes: one metrics line per step (two writers would double them), one adapter folder.
    lines = [json.loads(x) for x in (launch / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == [1, 2, 3, 4]
    assert stdout.count("run folder:") == 2  # one per run: the main process's


@pytest.mark.skipif(not TENSORBOARD, reason="tensorboard not installed")
def test_two_processes_write_one_tensorboard_run(runs):
    """Under torchrun only rank 0 writes tracker files: one scalar stream, each step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, launch, _ = runs
    with_scalars = [e for e in (launch / "two" / "tracking").rglob("events.out.tfevents.*")
                    if EventAccumulator(str(e)).Reload().Tags()["scalars"]]
    assert len(with_scalars) == 1, with_scalars
    steps = [e.step for e in EventAccumulator(str(with_scalars[0])).Reload().Scalars("train/loss")]
    assert steps == [1, 2, 3, 4]
    assert sorted(p.name for p in launch.iterdir()) == ["two"]


def test_dpo_two_processes_equal_one(runs, tmp_path):
    """DDP: 2 processes x 1 micro-batch of 2 pairs give the adapter (and the logged means) of 1 process x 2 micro-
    batches (the loss is normalised by the pairs of the whole step on both sides, as SFT's by its target tokens)."""
    _, launch, _ = runs
    root = launch.parent
    options = {**DPO, "model": str(root / "tiny"), "data": str(root / "pairs.jsonl"), "grad_accum": 2,
               "output": str(tmp_path / "one")}
    one = train(load_train_config(None, options), progress=False)
    want = load_file(str(one.saved / "adapter_model.safetensors"))
    got = load_file(str(root / "dpo-two" / "adapter" / "adapter_model.safetensors"))
    assert max(float(t.abs().max()) for k, t in want.items() if "lora_B" in k) > 1e-4
    assert max(float((want[k] - got[k]).abs().max()) for k in want) <= 1e-5
    steps_one, steps_two = _records(one.run_dir, "train"), _records(root / "dpo-two", "train")
    assert [r["step"] for r in steps_two] == [1, 2, 3] and all(r["pairs"] == 4 for r in steps_two)
    for a, b in zip(steps_one, steps_two, strict=True):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "preference_accuracy"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
