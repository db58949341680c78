"""RunDir: the run folder's layout, its checkpoints in step order, the one resume lookup, and hostile folders (a
checkpoint that is a file, a link, another name, half-written) skipped or refused in one line, never deleted."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.io.fs import MARKER_NAME, write_marker
from peftkit.train.checkpoints import Position, load_checkpoint, save_checkpoint
from peftkit.train.checkpoints.rundir import RunDir
from peftkit.train.config import load_train_config, resolve_defaults, save_config

ACCELERATOR = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)  # one process


def _cfg(output: Path | None, **options) -> object:
    return resolve_defaults(load_train_config(None, {"output": str(output) if output else None, **options}))


def _checkpoint(run: RunDir, step: int, *, complete: bool = True, ours: bool = True) -> Path:
    """A stand-in checkpoint folder (only what RunDir looks at: the position file and peftkit's marker)."""
    folder = run.checkpoint(step)
    folder.mkdir(parents=True)
    if complete:
        RunDir.position_file(folder).write_text(json.dumps({"step": step, "epoch": 0, "micro": 0, "tokens": 0}))
    if ours:
        write_marker(folder, "train")
    return folder


def _one_line_error(call) -> str:
    with pytest.raises(PeftkitError) as exc:
        call()
    message = str(exc.value)
    assert "\n" not in message, message
    return message


# layout --------------------------------------------------------------------------------------------------------------

def test_every_path_of_the_layout(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run == RunDir(str(tmp_path / "run")) and os.fspath(run) == str(tmp_path / "run") == str(run)
    assert {name: getattr(run, name).relative_to(run.path).as_posix() for name in (
        "config", "metrics", "curve", "summary", "adapter", "model", "tracking", "checkpoints_folder", "marker")} == {
        "config": "run_config.yaml", "metrics": "metrics.jsonl", "curve": "loss_curve.png", "summary": "summary.json",
        "adapter": "adapter", "model": "model", "tracking": "tracking", "checkpoints_folder": "checkpoints",
        "marker": MARKER_NAME}
    assert run.result(trains_base=True) == run.model and run.result(trains_base=False) == run.adapter
    assert run.checkpoint(7) == run.path / "checkpoints" / "step-000007"
    assert RunDir.holding(run.checkpoint(7)) == run and run.name == "run"
    assert RunDir.position_file(run.checkpoint(7)) == run.checkpoint(7) / "trainer_state.json"
    assert not run.path.exists()  # naming a folder creates nothing


def test_a_layout_entry_is_asked_of_a_run_folder_not_the_class():
    with pytest.raises(AttributeError, match="ask a RunDir"):
        _ = RunDir.metrics


def test_default_and_rescue_folders():
    assert RunDir.default("lora").path.parent == Path("runs") and RunDir.default("lora").name.startswith("lora-")
    assert RunDir.rescue().name.startswith("peftkit-rescue-") and str(os.getpid()) in RunDir.rescue().name


# checkpoints ---------------------------------------------------------------------------------------------------------

def test_checkpoints_are_in_step_order_not_name_order(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.checkpoints() == [] and run.latest_checkpoint() is None  # no folder at all
    for step in (1_000_000, 20, 3):  # step-1000000 sorts before step-999999 by name
        _checkpoint(run, step)
    assert [RunDir.step_of(c) for c in run.checkpoints()] == [3, 20, 1_000_000]
    assert run.latest_checkpoint() == run.checkpoint(1_000_000)
    assert run.earlier_checkpoint(run.checkpoint(1_000_000)) == run.checkpoint(20)
    assert run.earlier_checkpoint(run.checkpoint(3)) is None


def _hostile(tmp_path: Path) -> tuple[RunDir, Path]:
    """A run folder whose checkpoints/ holds two good checkpoints and every kind of entry peftkit did not write."""
    run = RunDir(tmp_path / "run")
    _checkpoint(run, 1)
    _checkpoint(run, 2)
    elsewhere = tmp_path / "elsewhere"
    _checkpoint(RunDir(elsewhere), 9)  # complete and marked, but reached through a link
    root = run.checkpoints_folder
    (root / "step-000009").symlink_to(elsewhere / "checkpoints" / "step-000009")
    (root / "step-000008").write_text("a file, not a folder")
    (root / "step-abc").mkdir()
    (root / "step-7").mkdir()  # not the step-NNNNNN spelling
    _checkpoint(run, 6, complete=False)  # half-written: no position file
    return run, elsewhere


def test_hostile_entries_are_skipped(tmp_path):
    run, _ = _hostile(tmp_path)
    assert run.checkpoints() == [run.checkpoint(1), run.checkpoint(2)]
    assert run.latest_checkpoint() == run.checkpoint(2)


def test_resume_skips_hostile_entries_with_a_warning(tmp_path, caplog):
    run, _ = _hostile(tmp_path)
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        assert RunDir.locate(_cfg(run.path, resume=True)) == (run, run.checkpoint(2))
    warning = caplog.text
    for name in ("step-000006 (incomplete", "step-000008 (a file", "step-000009 (a symbolic link", "step-abc",
                 "step-7 (not"):
        assert name in warning, warning


def test_pruning_never_deletes_what_peftkit_did_not_write(tmp_path):
    run, elsewhere = _hostile(tmp_path)
    _checkpoint(run, 3, ours=False)  # complete, but without peftkit's marker
    net = nn.Linear(2, 2)
    opt = torch.optim.AdamW(net.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    before = sorted(p.name for p in run.checkpoints_folder.iterdir())
    folder = save_checkpoint(run, net, opt, sched, Position(step=10), ACCELERATOR, keep=1)
    after = sorted(p.name for p in run.checkpoints_folder.iterdir())
    assert sorted(set(before) - set(after)) == ["step-000001", "step-000002"]  # only peftkit's own, complete ones
    assert set(after) - set(before) == {"step-000010"} and folder == run.latest_checkpoint()
    assert (elsewhere / "checkpoints" / "step-000009" / "trainer_state.json").is_file()  # the link's target
    assert load_checkpoint(folder, net, opt, sched, 0) == Position(step=10)


# the resume lookup ---------------------------------------------------------------------------------------------------

def test_a_fresh_run_resumes_nothing(tmp_path):
    assert RunDir.locate(_cfg(tmp_path / "new")) == (RunDir(tmp_path / "new"), None)


def test_resume_takes_the_newest_complete_checkpoint_of_the_same_run(tmp_path):
    run = RunDir(tmp_path / "run")
    _checkpoint(run, 2)
    _checkpoint(run, 4)
    _checkpoint(run, 6, complete=False)
    save_config(_cfg(run.path), run.config)
    assert RunDir.locate(_cfg(run.path, resume=True, max_steps=99)) == (run, run.checkpoint(4))
    message = _one_line_error(lambda: RunDir.locate(_cfg(run.path, resume=True, lr=0.5)))
    assert "options differ" in message and "lr" in message


def test_resume_without_output_takes_the_newest_run_of_the_method(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _checkpoint(RunDir("runs/lora-20260101-000000"), 1)
    newest = RunDir("runs/lora-20260202-000000")
    _checkpoint(newest, 5)
    Path("runs/lora-20260303-000000").write_text("a file, not a run")
    assert RunDir.locate(_cfg(None, resume=True, method="lora")) == (newest, newest.checkpoint(5))
    message = _one_line_error(lambda: RunDir.locate(_cfg(None, resume=True, method="prefix")))
    assert "no run folder runs/prefix-*" in message and "--output" in message


@pytest.mark.parametrize("setup, expected", [
    (lambda run: run.path.mkdir(), "holds no checkpoint"),
    (lambda run: _checkpoint(run, 3, complete=False), "holds no complete checkpoint"),
    (lambda run: (run.path.mkdir(), run.checkpoints_folder.write_text("x")), "is a file, not the checkpoints folder"),
    (lambda run: (run.path.mkdir(), run.checkpoints_folder.symlink_to(run.path.parent)),
     "is a symbolic link, not the checkpoints folder"),
])
def test_resume_with_nothing_to_resume_is_one_line(tmp_path, setup, expected):
    run = RunDir(tmp_path / "run")
    setup(run)
    before = sorted(p.name for p in run.path.rglob("*"))
    message = _one_line_error(lambda: RunDir.locate(_cfg(run.path, resume=True)))
    assert expected in message and str(run) in message
    assert sorted(p.name for p in run.path.rglob("*")) == before  # nothing written, nothing deleted


def test_a_fresh_run_refuses_a_folder_holding_another_run(tmp_path):
    run = RunDir(tmp_path / "run")
    _checkpoint(run, 1)
    message = _one_line_error(lambda: RunDir.locate(_cfg(run.path)))
    assert "--overwrite" in message and "--resume" in message
    message = _one_line_error(lambda: RunDir.locate(_cfg(run.path, overwrite=True)))  # no marker on the run folder
    assert "did not write" in message
    write_marker(run.path, "train")
    assert RunDir.locate(_cfg(run.path, overwrite=True)) == (run, None)


# creating it ---------------------------------------------------------------------------------------------------------

def test_fresh_creates_the_folder_with_the_marker_and_restores_a_failed_overwrite(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.fresh():
        assert run.marker.is_file()
        run.summary.write_text("first")
    with pytest.raises(RuntimeError), run.fresh():
        assert not run.summary.exists()  # the previous run is set aside while the new one runs
        raise RuntimeError("the new run failed before its first checkpoint")
    assert run.summary.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["run"]
