"""A run folder is owned by one process (an OS lock beside it, the holder named), and --resume checks everything it
will read or append to before it starts: symbolic links out of the run folder and a damaged metrics.jsonl are one
`error:` line with exit code 2, and nothing outside the run folder is written."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from peftkit.cli import main
from peftkit.train.checkpoints.claim import lock_file
from peftkit.train.checkpoints.rundir import RunDir
from tests.cli_errors import cli_error_line
from tests.tiny import save_tiny_checkpoint, tiny_model, write_rows

HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 2-step CLI run with a checkpoint after each step: (its argv, its run folder)."""
    root = tmp_path_factory.mktemp("guard")
    model, data = save_tiny_checkpoint(root / "tiny"), write_rows(root / "d.jsonl", 4)
    argv = ["train", "--quiet", "--model", str(model), "--data", str(data), "--output", str(root / "run"),
            "--max-steps", "2", "--save-steps", "1", "--batch-size", "2", "--max-length", "48", "--precision", "fp32"]
    main(argv)
    return argv, root / "run"


def _copy(finished, tmp_path) -> tuple[list[str], Path]:
    """A copy of the finished run and the argv that resumes it."""
    argv, run = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    at = argv.index("--output") + 1
    return [*argv[:at], str(copy), *argv[at + 1:], "--resume", "--max-steps", "3"], copy


def test_a_finished_run_leaves_no_lock_file(finished):
    _, run = finished
    assert (run / "adapter").is_dir() and not lock_file(RunDir(run)).exists()
    assert sorted(p.name for p in run.parent.iterdir() if p.name.startswith(".")) == []


def test_a_second_process_on_the_same_folder_is_refused_naming_the_holder(finished, tmp_path, capsys):
    argv, copy = _copy(finished, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock_file(RunDir(copy)))], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        before = {p.name: p.stat().st_mtime_ns for p in copy.iterdir()}
        for attempt in (argv, [*argv[:-3], "--overwrite"]):  # resuming it, or replacing it
            message = cli_error_line(attempt, capsys)
            assert f"in use by process {holder.pid}" in message and str(copy) in message, message
        assert {p.name: p.stat().st_mtime_ns for p in copy.iterdir()} == before  # untouched
    finally:
        holder.kill()
        holder.wait()
    assert "in use" not in cli_error_line([*argv[:-3]], capsys)  # released with its process: the usual "not empty" refusal


def test_resume_refuses_a_symlink_out_of_the_run_folder(finished, tmp_path, capsys):
    argv, copy = _copy(finished, tmp_path)
    outside = tmp_path / "outside.jsonl"
    outside.write_text("")
    (copy / "metrics.jsonl").unlink()
    (copy / "metrics.jsonl").symlink_to(outside)
    message = cli_error_line(argv, capsys)
    assert "metrics.jsonl is a symbolic link" in message
    assert outside.read_text() == ""  # nothing appended through the link

    argv, copy = _copy(finished, tmp_path / "b")
    elsewhere = tmp_path / "elsewhere"
    shutil.move(copy / "adapter", elsewhere)
    (copy / "adapter").symlink_to(elsewhere)
    assert "adapter is a symbolic link" in cli_error_line(argv, capsys)  # refused before training, not after
    assert not RunDir(copy).checkpoint(3).exists()


@pytest.mark.parametrize("damage", ['{"kind": "train", "step": 1, "lo', "not json", '[1, 2]', '{"kind": "eval"}',
                                    "\udcff"])
def test_resume_refuses_a_damaged_metrics_file_naming_the_line(finished, tmp_path, capsys, damage):
    argv, copy = _copy(finished, tmp_path)
    metrics = copy / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_bytes(("\n".join([lines[0], damage, *lines[1:]]) + "\n").encode("utf-8", "surrogateescape"))
    message = cli_error_line(argv, capsys)
    assert str(metrics) in message
    assert "line 2" in message or "not UTF-8" in message, message
    assert not RunDir(copy).checkpoint(3).exists()


def test_the_lock_is_taken_again_after_a_release_race(tmp_path):
    """Taking a lock whose file the previous holder removed takes the new file (never two holders)."""
    from peftkit.train.checkpoints.claim import locked

    run = RunDir(tmp_path / "run")
    with locked(run):
        assert lock_file(run).read_text().strip() == str(os.getpid())
    assert not lock_file(run).exists()
    with locked(run), pytest.raises(Exception, match="in use by process"), locked(run):
        pass


def test_a_new_run_failing_before_its_first_checkpoint_leaves_nothing(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(OSError), run.fresh():
        run.config.write_text("model: x\n")
        run.metrics.write_text("")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert not run.path.exists()

    mine = RunDir(tmp_path / "mine")  # the user's empty folder: emptied again, kept
    mine.path.mkdir()
    with pytest.raises(RuntimeError), mine.fresh():
        mine.config.write_text("model: x\n")
        raise RuntimeError("failed")
    assert mine.path.is_dir() and list(mine.path.iterdir()) == []

    resumable = RunDir(tmp_path / "resumable")  # with a checkpoint it can be resumed: kept
    with pytest.raises(RuntimeError), resumable.fresh():
        RunDir.position_file(resumable.checkpoint(1)).parent.mkdir(parents=True)
        RunDir.position_file(resumable.checkpoint(1)).write_text("{}")
        raise RuntimeError("failed")
    assert resumable.checkpoints() == [resumable.checkpoint(1)]


def test_a_full_disk_in_a_new_run_is_exit_2_and_removes_the_folder(finished, tmp_path, capsys, monkeypatch):
    import peftkit.train.run as run_module

    argv, _ = finished
    at = argv.index("--output") + 1
    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_module, "save_config", full)
    message = cli_error_line([*argv[:at], str(tmp_path / "new"), *argv[at + 1:]], capsys)
    assert "No space left on device" in message
    assert not (tmp_path / "new").exists() and not lock_file(RunDir(tmp_path / "new")).exists()


def test_a_tokenizer_larger_than_the_embedding_is_refused_before_anything(tmp_path, capsys):
    from transformers import AutoTokenizer

    from peftkit.io.models import embedded_folder

    tiny_model("llama").save_pretrained(tmp_path / "small")  # 128 embedding rows
    AutoTokenizer.from_pretrained(embedded_folder()).save_pretrained(tmp_path / "small")
    data = write_rows(tmp_path / "d.jsonl", 2)
    message = cli_error_line(["train", "--quiet", "--model", str(tmp_path / "small"), "--data", str(data), "--output",
                      str(tmp_path / "run"), "--max-steps", "1"], capsys)
    assert "128 embedding rows" in message and "49,152 tokens" in message
    assert not (tmp_path / "run").exists()
