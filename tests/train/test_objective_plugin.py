"""An objective defined outside peftkit is an objective like the built-ins: examples/smoothed_sft_plugin (SFT with
label smoothing) is found through its `peftkit.objectives` entry point, gets its `--label-smoothing` flag and
recipe key from its declared option (with `peftkit train --help` still importing no torch), computes torch's
label-smoothed cross-entropy (SFT's loss at 0), and trains end to end.

Nothing is pip-installed: the entry-point tests put the example and a `*.dist-info` folder holding its
entry_points.txt on the PYTHONPATH of a fresh interpreter (importlib.metadata finds distributions on sys.path);
the other tests register the plugin in this process with `peftkit.register_objective` and restore the registry
after.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit.train.config import load_train_config
from peftkit.train.objectives import base
from peftkit.train.objectives.sft import SftRun
from peftkit.train.run import train
from tests.tiny import save_tiny_checkpoint, tiny_input, tiny_model, write_rows

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "smoothed_sft_plugin"
HEAVY = ("torch", "transformers", "datasets", "accelerate")

# Runs the CLI, then prints the registered objectives and the heavy modules it ended up importing (JSON, last line).
HELP = f"""
import json, sys
from peftkit.cli import main
main(sys.argv[1:])
from peftkit.train.objectives.base import objective_names
print(json.dumps({{"heavy": sorted(m for m in {HEAVY!r} if m in sys.modules), "objectives": objective_names()}}))
"""

# Runs several CLI commands in one interpreter (one import of torch, not one per command): [[exit code, out, err]].
COMMANDS = """
import contextlib, io, json, sys
from peftkit.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code
    results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A folder holding a minimal installed-distribution record of the example, with its entry point."""
    site = tmp_path_factory.mktemp("site")
    info = site / "peftkit_smoothed_sft-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: peftkit-smoothed-sft\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[peftkit.objectives]\nsmoothed_sft = peftkit_smoothed_sft:SmoothedSft\n")
    return site


def fresh_python(site: Path, code: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter that sees the plugin only through its entry point."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(EXAMPLE), str(site)]), "HF_HUB_OFFLINE": "1",
           "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=cwd, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_entry_point_adds_the_objective_and_its_flag_without_torch(site):
    *shown, last = fresh_python(site, HELP, "train", "--help").stdout.rstrip("\n").split("\n")
    listed = json.loads(last)
    assert listed["objectives"] == ["sft", "dpo", "orpo", "simpo", "kto", "grpo", "smoothed_sft"]
    assert listed["heavy"] == [], f"train --help imported {listed['heavy']}"
    flag = next(i for i, line in enumerate(shown) if "--label-smoothing" in line)
    assert "(--objective smoothed_sft; default 0.1)" in " ".join(shown[flag:flag + 3])  # the flag's help names it


@pytest.fixture(scope="module")
def commands(site, tmp_path_factory) -> dict[str, tuple[int, str, str]]:
    """{name: (exit code, stdout, stderr)} of `peftkit train ... --print-config` commands using the plugin."""
    folder = tmp_path_factory.mktemp("recipes")
    (folder / "r.yaml").write_text("label_smoothing_factor: 0.05\n")  # HF TrainingArguments' name, an alias
    runs = {"too big": ["--objective", "smoothed_sft", "--label-smoothing", "1.5"],
            "no objective": ["--label-smoothing", "0.2"],
            "default": ["--objective", "smoothed_sft"],
            "flag": ["--objective", "smoothed_sft", "--label-smoothing", "0.2"],
            "recipe": ["--objective", "smoothed_sft", "--config", "r.yaml"]}
    argvs = [["train", *args, "--print-config"] for args in runs.values()]
    out = fresh_python(site, COMMANDS, json.dumps(argvs), cwd=folder)
    return dict(zip(runs, map(tuple, json.loads(out.stdout.splitlines()[-1])), strict=True))


@pytest.mark.parametrize("name, error", [
    ("too big", "error: label_smoothing must be >= 0 and < 1, got 1.5"),
    ("no objective",
     "error: --label-smoothing is an option of smoothed_sft; add --objective smoothed_sft (the objective is sft)"),
])
def test_cli_refuses_a_bad_value_and_the_option_without_its_objective(commands, name, error):
    code, out, err = commands[name]
    assert code == 2 and out == "" and err.splitlines() == [error], err[-3000:]


@pytest.mark.parametrize("name, line", [
    ("default", "label_smoothing: 0.1  # default (objective smoothed_sft)"),
    ("flag", "label_smoothing: 0.2  # flag --label-smoothing"),
    ("recipe", "label_smoothing: 0.05  # recipe r.yaml (label_smoothing_factor)"),
])
def test_print_config_shows_the_option_and_its_source(commands, name, line):
    code, out, err = commands[name]
    assert code == 0, err[-3000:]
    assert [text for text in out.splitlines() if text.startswith("label_smoothing:")] == [line]


@pytest.fixture
def smoothed(monkeypatch):
    """The plugin's module, its objective registered in this process; the registry is restored afterwards."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    base.objective_names()  # built-ins (and installed plugins) first
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    import peftkit_smoothed_sft

    peftkit.register_objective(peftkit_smoothed_sft.SmoothedSft)
    return peftkit_smoothed_sft


def fixed_batch() -> dict[str, torch.Tensor]:
    """Two rows of 7 tokens: prompt positions masked (-100), the second row right-padded by one token."""
    ids = tiny_input(batch=2, length=7)
    labels, mask = ids.clone(), torch.ones_like(ids)
    labels[0, :3] = labels[1, :2] = labels[1, 6] = -100
    mask[1, 6] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def test_loss_is_torch_label_smoothed_cross_entropy_and_sft_at_zero(smoothed):
    model, batch, smoothing = tiny_model("llama"), fixed_batch(), 0.1
    with torch.no_grad():
        got = smoothed.SmoothedSftRun(smoothing, collate=None).loss(model, batch, "fused")
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    want = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), label_smoothing=smoothing, reduction="sum")
    assert got.dtype == torch.float32 and got.ndim == 0 and abs(got - want) <= 1e-6
    # The same by hand: (1 - e) * -log p(target) + e * the mean of -log p over the vocabulary, per target token.
    logp, kept = logits.log_softmax(-1), targets != -100
    nll = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    by_hand = ((1 - smoothing) * nll - smoothing * logp.mean(-1))[kept].sum()
    assert kept.sum() == 4 + 4 and abs(got - by_hand) <= 1e-6 * by_hand  # 8 targets; relative: a sum of ~40
    with torch.no_grad():
        unsmoothed = smoothed.SmoothedSftRun(0.0, collate=None).loss(model, batch, "fused")
        sft = {path: SftRun(collate=None).loss(model, batch, path) for path in ("full", "keep", "fused")}
    assert abs(unsmoothed - sft["full"]) <= 1e-6 * sft["full"]
    assert all(abs(unsmoothed - value) <= 1e-5 * value for value in sft.values())  # fused: chunked, other rounding
    assert got - unsmoothed > 1e-3  # smoothing changes the loss


def test_trains_end_to_end_with_its_option(smoothed, tmp_path, monkeypatch):
    seen = []  # the label_smoothing of every micro-batch loss the loop asked for
    loss = smoothed.SmoothedSftRun.loss
    monkeypatch.setattr(smoothed.SmoothedSftRun, "loss",
                        lambda run, *args: seen.append(run.label_smoothing) or loss(run, *args))
    model_dir, data = save_tiny_checkpoint(tmp_path / "tiny"), write_rows(tmp_path / "d.jsonl", 8)
    cfg = load_train_config(None, dict(model=str(model_dir), data=str(data), eval_data=str(data),
                                       objective="smoothed_sft", label_smoothing=0.2, max_steps=6, batch_size=8,
                                       max_length=64, lr=1e-2, warmup=0, precision="fp32",
                                       output=str(tmp_path / "run")))
    result = train(cfg, progress=False)
    records = [json.loads(line) for line in result.run_dir.metrics.read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 6 and losses[-1] < losses[0], losses  # the same 8 rows every step
    assert len(seen) >= 6 and set(seen) == {0.2}
    assert result.after["loss"] < result.before["loss"]  # the held-out (plain cross-entropy) loss falls too
    assert "label_smoothing: 0.2" in result.run_dir.config.read_text()
