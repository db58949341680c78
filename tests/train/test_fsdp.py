"""FSDP2 over two CPU processes (gloo): the same adapter as one process, a gathered save, a whole fine-tuned model,
GRPO, exact resume on two "nodes".

Setup as in test_distributed.py: 1 process with micro-batches of 2 and grad_accum 2 sees the same 4 examples per
step as 2 processes with one micro-batch each, and the loss is normalised by the whole step's target tokens, so the
updates are mathematically equal (fp32: measured equal). Under FSDP2 each process holds half of every LoRA matrix (and of its AdamW
moments); the saved adapter must still be the whole one. Each launch costs ~15-25 s (imports on a busy 2-core
machine), so one launch runs the module's three uninterrupted runs one after the other (LoRA, full fine-tuning,
GRPO: `peftkit train` three times in the same processes, as several runs in one process are meant to work), and
the interrupted run is resumed by the two-"node" launch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from peftkit.train.checkpoints.rundir import RunDir
from peftkit.train.config import load_train_config
from peftkit.train.run import train
from tests.tiny import save_tiny_checkpoint, write_rows
from tests.train.sharded_grpo import check_two_steps, grpo_options
from tests.train.test_distributed import REPO, _flags, _free_port

COMMON = dict(max_steps=4, batch_size=2, max_length=64, lr=1e-2, rank=4, dropout=0.0, precision="fp32", seed=3,
              save_steps=2, eval_split="0")


def _launch(launcher: list[str], args: list[str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *launcher, *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=timeout)


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return _launch(["--nproc_per_node", "2", "--master_port", str(_free_port())], args, cwd)


def _full(options: dict) -> dict:
    """The full fine-tune of `options`' model and data: 2 steps, no LoRA options."""
    full = {**options, "method": "full", "lr": 1e-3, "max_steps": 2, "save_steps": None}
    return {k: v for k, v in full.items() if k not in ("rank", "dropout") and v is not None}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(folder, train options, GRPO's options) after one launch of three uninterrupted FSDP runs: LoRA (folder
    two/), full fine-tuning (full2/) and GRPO (grpo/run/), each `peftkit train` with its flags."""
    root = tmp_path_factory.mktemp("fsdp")
    model = save_tiny_checkpoint(root / "tiny")
    write_rows(root / "train.jsonl", 16)
    options = dict(model=str(model), data=str(root / "train.jsonl"), **COMMON)
    (root / "grpo").mkdir()
    grpo = grpo_options(root / "grpo")
    argvs = [["train", *_flags({**options, "grad_accum": 1, "fsdp": True, "output": root / "two", "quiet": True})],
             ["train", *_flags({**_full(options), "grad_accum": 1, "fsdp": True, "output": root / "full2",
                                "quiet": True})],
             ["train", *_flags({**grpo, "fsdp": True, "quiet": True})]]
    script = root / "three_runs.py"
    script.write_text(f"from peftkit.cli import main\nfor argv in {argvs!r}:\n    main(argv)\n")
    proc = _torchrun([str(script)], root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return root, options, grpo


def test_fsdp_two_processes_equal_one_and_save_the_whole_adapter(runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, options, _ = runs
    one = train(load_train_config(None, {**options, "grad_accum": 2, "output": str(root / "one")}), progress=False)
    want = load_file(str(one.saved / "adapter_model.safetensors"))
    got = load_file(str(root / "two" / "adapter" / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    for key, value in want.items():
        assert got[key].shape == value.shape, key  # whole matrices, not one process's half
        if "lora_B" in key:  # every output row was trained (a rank-0-only save leaves half of them at zero)
            assert bool((got[key].abs().sum(dim=1) > 0).all()), key
            update = float(value.abs().max())
            assert update > 1e-3
            assert float((got[key] - value).abs().max()) <= 0.01 * update, key
    # each process wrote its slice of the trained state, none pickled
    shards = sorted(p.name for p in (root / "two" / "checkpoints" / "step-000002").iterdir())
    assert "shard-00000-of-00002.safetensors" in shards and "shard-00001-of-00002.safetensors" in shards
    assert not [name for name in shards if name.endswith((".pt", ".bin", ".metadata", ".pkl"))]
    base = AutoModelForCausalLM.from_pretrained(options["model"])
    peft = PeftModel.from_pretrained(base, str(root / "two" / "adapter"))
    assert peft.peft_config["default"].r == 4


def test_fsdp_sigkill_then_resume_on_two_nodes_equals_uninterrupted(runs):
    """Killed (SIGKILL) after its step-2 checkpoint, then resumed by two "nodes" of one process each, rendezvous
    over c10d on localhost: the same adapter as the uninterrupted 2-process run on one node."""
    root, options, _ = runs
    killed = root / "killed"
    script = root / "kill_at_2.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal
        from peftkit.train.config import load_train_config
        from peftkit.train.run import train
        def die(step):
            os.kill(os.getpid(), signal.SIGKILL)
        options = {{**{options!r}, "grad_accum": 1, "fsdp": True, "output": {str(killed)!r}}}
        train(load_train_config(None, options), progress=False, on_checkpoint=die)
    """))
    proc = _torchrun([str(script)], root)
    assert proc.returncode != 0
    assert [p.name for p in RunDir(killed).checkpoints()] == ["step-000002"]
    assert not (killed / "adapter").exists()
    port = _free_port()
    args = [str(REPO / "cli.py"), "train", *_flags({**options, "grad_accum": 1, "fsdp": True, "output": killed,
                                                    "resume": True, "quiet": True})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
                               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                               f"127.0.0.1:{port}", *args], cwd=root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=180)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert sum(out.count("run folder:") for out in outputs) == 1  # one main process over both nodes
    assert sum(out.count("resuming from") for out in outputs) == 1
    want = load_file(str(root / "two" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    assert max(float(t.abs().max()) for k, t in want.items() if "lora_B" in k) > 1e-3
    for key in want:
        assert float((want[key] - got[key]).abs().max()) <= 1e-6, key


def test_fsdp_full_fine_tune_saves_a_loadable_model(runs):
    from transformers import AutoModelForCausalLM

    root, options, _ = runs
    full = _full(options)
    one = train(load_train_config(None, {**full, "grad_accum": 2, "output": str(root / "full1")}), progress=False)
    base = AutoModelForCausalLM.from_pretrained(options["model"]).state_dict()
    want = AutoModelForCausalLM.from_pretrained(str(one.saved)).state_dict()
    saved = root / "full2" / "model"
    assert '"LlamaForCausalLM"' in (saved / "config.json").read_text()
    got = AutoModelForCausalLM.from_pretrained(str(saved)).state_dict()
    assert want.keys() == got.keys()
    update = max(float((want[k] - base[k]).abs().max()) for k in want)
    assert update > 1e-4
    for key in want:
        assert float((want[key] - got[key]).abs().max()) <= 0.01 * update, key


def test_two_grpo_steps_under_fsdp(runs):
    """GRPO's sampling loops end at different steps on the two processes and stop together (sharded_grpo.py)."""
    check_two_steps(runs[2], ["rollout_s"])
