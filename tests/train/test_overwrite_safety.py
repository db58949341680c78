"""`train --overwrite` never loses the previous run before the new one is complete, a failed final save keeps the
trained weights, and Ctrl-C says how to resume."""

from __future__ import annotations

import errno
import json

import pytest

import peftkit.train.run as run_module
from peftkit.errors import PeftkitError
from peftkit.io.fs import MARKER_NAME
from peftkit.train.config import load_train_config
from peftkit.train.run import train
from tests.tiny import save_tiny_checkpoint, write_rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("overwrite")
    write_rows(root / "train.jsonl", 12)
    write_rows(root / "eval.jsonl", 2, offset=50)
    return root, save_tiny_checkpoint(root / "tiny")


def _cfg(tiny, out, **extra):
    root, model = tiny
    options = dict(model=str(model), data=str(root / "train.jsonl"), eval_data=str(root / "eval.jsonl"), max_steps=2,
                   batch_size=4, max_length=64, precision="fp32", output=str(out), eval_examples=1, **extra)
    return load_train_config(None, options)


def _first_run(tiny, out):
    train(_cfg(tiny, out), progress=False)
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / MARKER_NAME).is_file()
    return json.loads((out / "summary.json").read_text())


def test_failed_overwrite_restores_the_previous_run(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    before = _first_run(tiny, out)

    def boom(loop, pos):
        raise PeftkitError("the loss became nan at step 1")

    monkeypatch.setattr(run_module, "fit", boom)
    with pytest.raises(PeftkitError, match="nan"):
        train(_cfg(tiny, out, overwrite=True), progress=False)
    assert json.loads((out / "summary.json").read_text()) == before  # the previous run, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # nothing set aside is left over


def test_overwrite_that_fails_after_a_checkpoint_keeps_both(tiny, tmp_path):
    out = tmp_path / "run"
    _first_run(tiny, out)

    def stop(step):
        raise PeftkitError("stopped after the first checkpoint")

    with pytest.raises(PeftkitError, match="stopped"):
        train(_cfg(tiny, out, overwrite=True, save_steps=1), progress=False, on_checkpoint=stop)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("run.previous-")]
    assert len(kept) == 1 and (kept[0] / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoints").is_dir()  # the new run can be resumed
    resumed = train(_cfg(tiny, out, resume=True, save_steps=1), progress=False)
    assert resumed.steps == 2


def test_successful_overwrite_replaces_the_previous_run(tiny, tmp_path):
    out = tmp_path / "run"
    _first_run(tiny, out)
    (out / "old_only.txt").write_text("from the first run")
    train(_cfg(tiny, out, overwrite=True), progress=False)
    assert not (out / "old_only.txt").exists() and (out / "adapter").is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_overwrite_of_a_folder_peftkit_did_not_write_is_refused(tiny, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.md").write_text("keep me")
    with pytest.raises(PeftkitError, match="did not write"):
        train(_cfg(tiny, out, overwrite=True), progress=False)
    assert (out / "notes.md").read_text() == "keep me"


def test_failed_final_save_keeps_the_weights(tiny, tmp_path, monkeypatch):
    real = run_module._write_result
    calls = []

    def full_disk(model, tokenizer, folder, method, prompt_format):
        calls.append(folder)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(model, tokenizer, folder, method, prompt_format)

    monkeypatch.setattr(run_module, "_write_result", full_disk)
    with pytest.raises(PeftkitError, match="No space left on device.*saved to") as err:
        train(_cfg(tiny, tmp_path / "run"), progress=False)
    rescue = calls[1].adapter
    assert str(rescue) in str(err.value) and (rescue / "adapter_model.safetensors").is_file()


def test_ctrl_c_says_where_the_checkpoint_is(tiny, tmp_path, caplog):
    def interrupt(step):
        raise KeyboardInterrupt

    with caplog.at_level("WARNING", logger="peftkit"), pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny, tmp_path / "run", save_steps=1), progress=False, on_checkpoint=interrupt)
    assert "newest checkpoint is" in caplog.text and "--resume" in caplog.text and "step-000001" in caplog.text


def test_no_eval_before_skips_the_baseline_and_the_summary_counts_parameters(tiny, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny, out, eval_before=False), progress=False)
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["before"] == {} and summary["after"]["loss"] > 0
    assert [r["step"] for r in records if r["kind"] == "eval"] == [2]  # only after training
    assert 0 < summary["trainable_parameters"] < summary["total_parameters"]
    assert summary["last_train_loss"] == [r for r in records if r["kind"] == "train"][-1]["loss"]
