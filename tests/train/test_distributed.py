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

REPO = Path(__file__).resolve().parents[2]
TENSORBOARD = importlib.util.find_spec("tensorboard") is not None  # a dev dependency


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process run, the torchrun launch's working folder and its output: one launch (~12 s of imports on
    this 2-core machine) serves every test of this module. The launch also reports to TensorBoard, which under
    torchrun only rank 0 may write."""
    root = tmp_path_factory.mktemp("ddp")
    model = save_tiny_checkpoint(root / "tiny")
    write_rows(root / "train.jsonl", 16)
    common = dict(model=str(model), data=str(root / "train.jsonl"), eval_split="0", max_steps=4, batch_size=2,
                  max_length=64, lr=1e-2, rank=4, dropout=0.0, precision="fp32", seed=3)
    one = train(load_train_config(None, {**common, "grad_accum": 2, "output": str(root / "one")}), progress=False)

    launch = root / "launch"  # the launch's working folder: nothing but the run folder may appear in it
    launch.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(REPO / "cli.py"), "train", "--model", str(model), "--data", str(root / "train.jsonl"),
           "--eval-split", "0", "--max-steps", "4", "--batch-size", "2", "--grad-accum", "1", "--max-length", "64",
           "--lr", "1e-2", "--rank", "4", "--dropout", "0", "--precision", "fp32", "--seed", "3", "--quiet",
           "--output", str(launch / "two"), *(["--report-to", "tensorboard"] if TENSORBOARD else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
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
    assert stdout.count("run folder:") == 1


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
