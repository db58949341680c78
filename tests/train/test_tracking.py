"""`--report-to`: the trackers get the same scalars as metrics.jsonl, inside the run folder; bad names and missing
packages fail before the run folder is touched."""

from __future__ import annotations

import importlib.util
import json

import pytest

from peftkit.cli import main
from peftkit.errors import PeftkitError
from peftkit.train.config import load_train_config
from peftkit.train.reporting.tracking import flat_config, parse_report_to, tracker_names
from tests.tiny import save_tiny_checkpoint, write_rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    return save_tiny_checkpoint(root / "tiny"), write_rows(root / "d.jsonl", 24)


def _train(tiny, out, report_to: str, **extra) -> list[dict]:
    from peftkit.train.run import train

    model, data = tiny
    cfg = load_train_config(None, dict(model=str(model), data=str(data), output=str(out), max_steps=3, batch_size=4,
                                       eval_split="4", eval_steps=2, max_length=64, precision="fp32",
                                       report_to=report_to, **extra))
    train(cfg, progress=False)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _expected(records: list[dict]) -> dict[str, dict[int, float]]:
    """metrics.jsonl as tag -> {step: value} for every numeric field (what the trackers must hold)."""
    out: dict[str, dict[int, float]] = {}
    for r in records:
        for key, value in r.items():
            if key not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                out.setdefault(f"{r['kind']}/{key}", {})[r["step"]] = float(value)
    return out


def test_parse_report_to():
    assert parse_report_to("none") == []
    assert parse_report_to(None) == []
    assert parse_report_to("tensorboard, wandb,tensorboard") == ["tensorboard", "wandb"]
    assert parse_report_to(["mlflow", "tensorboard"]) == ["mlflow", "tensorboard"]
    installed = [n for n in ("tensorboard", "wandb", "mlflow") if importlib.util.find_spec(n) is not None]
    assert parse_report_to("all") == installed
    with pytest.raises(PeftkitError, match="unknown tracker 'comet'.*tensorboard, wandb, mlflow"):
        parse_report_to("tensorboard,comet")


def test_recipe_list_and_hf_spelling(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("report_to: [tensorboard, wandb]\n")
    assert load_train_config(recipe).report_to == "tensorboard,wandb"
    assert load_train_config(None, {"report_to": "none"}).report_to == "none"


def test_flat_config_keeps_scalars_and_serialises_the_rest():
    flat = flat_config({"lr": 0.1, "set": {"a": 1}, "model": None, "packing": True})
    assert flat == {"lr": 0.1, "set": '{"a": 1}', "model": None, "packing": True}


def test_missing_package_is_one_line_before_the_run_folder(tiny, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(PeftkitError, match="pip install wandb"):
        tracker_names("tensorboard,wandb")
    model, data = tiny
    with pytest.raises(SystemExit) as exc:
        main(["train", "--quiet", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "out"),
              "--max-steps", "1", "--report-to", "wandb"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "pip install wandb" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_unknown_tracker_on_the_cli(tiny, tmp_path, capsys):
    model, data = tiny
    with pytest.raises(SystemExit) as exc:
        main(["train", "--quiet", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "out"),
              "--report-to", "tensorboard", "--report-to", "neptune"])
    assert exc.value.code == 2
    assert "unknown tracker 'neptune'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_tracker_that_fails_to_start_is_one_line(tmp_path, monkeypatch):
    from peftkit.train.devices.precision import make_accelerator
    from peftkit.train.reporting.tracking import Tracking

    acc, _, _ = make_accelerator("fp32", log_with=["tensorboard"])

    def refuse(*args, **kwargs):
        raise RuntimeError("api_key not configured (no-tty)\nmore lines")

    monkeypatch.setattr(acc, "init_trackers", refuse)
    with pytest.raises(PeftkitError, match=r"^--report-to tensorboard: the tracker did not start \(api_key not "
                                           r"configured \(no-tty\)\); for W&B run `wandb login`"):
        Tracking.start(acc, tmp_path / "tracking", "run", {})


def test_default_writes_no_tracking_folder(tiny, tmp_path):
    _train(tiny, tmp_path / "run", "none")
    assert not (tmp_path / "run" / "tracking").exists()
    assert (tmp_path / "run" / "loss_curve.png").is_file()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_scalars_equal_metrics_jsonl(tiny, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    records = _train(tiny, out, "tensorboard")
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # nothing written outside the run folder
    expected = _expected(records)
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/loss"} <= set(expected)
    assert sorted(expected["eval/loss"]) == [0, 2, 3]
    events = list((out / "tracking").rglob("events.out.tfevents.*"))
    scalars_dir = next(e.parent for e in events if EventAccumulator(str(e.parent)).Reload().Tags()["scalars"])
    acc = EventAccumulator(str(scalars_dir)).Reload()
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, by_step in expected.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert got == pytest.approx(by_step, rel=1e-6), tag  # float32 in the event file
    hparams = next((out / "tracking").rglob("hparams.yml")).read_text()
    assert "report_to: tensorboard" in hparams and "max_steps: 3" in hparams


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_wandb_offline_run_holds_the_scalars(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    records = _train(tiny, out, "wandb")
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    runs = list((out / "tracking" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    saved = _wandb_records(next(runs[0].glob("*.wandb")))
    history = _wandb_history(saved)
    expected = _expected(records)
    for tag, by_step in expected.items():
        got = {row["_step"]: row[tag] for row in history if tag in row}
        assert got == pytest.approx(by_step, rel=1e-9), tag
    config = {item.key: json.loads(item.value_json) for r in saved if r.WhichOneof("record_type") == "config"
              for item in r.config.update}
    assert config["report_to"] == {"value": "wandb"} or config["report_to"] == "wandb", config.get("report_to")
    assert config["max_steps"] in (3, {"value": 3})


def _wandb_records(path) -> list:
    """The protobuf records of an offline .wandb file. wandb 0.31 has no Python reader any more (its core is in
    Go), so this reads the format directly: a 7-byte header (":W&B", 0xBEE1, version 0), then LevelDB's log format,
    32 KiB blocks of chunks (crc32c: 4 bytes, length: 2, type: 1 = full, 2 = first, 3 = middle, 4 = last)."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:7] == b":W&B\xe1\xbe\x00", raw[:7]
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(raw[pos + 4:pos + 6], "little"), raw[pos + 6]
        if kind == 0:
            break
        pending += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_history(records: list) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow not installed")
def test_mlflow_file_store_holds_the_scalars(tiny, tmp_path, monkeypatch):
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3: file stores only on request
    records = _train(tiny, tmp_path / "run", "mlflow")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("peftkit")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["report_to"] == "mlflow" and run.data.params["max_steps"] == "3"
    for tag, by_step in _expected(records).items():
        got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, tag)}
        assert got == pytest.approx(by_step, rel=1e-9), tag


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow not installed")
def test_mlflow_default_store_is_inside_the_run_folder(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    records = _train(tiny, tmp_path / "run", "mlflow")
    import mlflow
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "run" / "tracking" / "mlruns").as_uri()
    (run,) = MlflowClient(tracking_uri=store).search_runs([mlflow.get_experiment_by_name("peftkit").experiment_id])
    assert run.data.metrics["train/loss"] == pytest.approx(records[-2]["loss"], rel=1e-9)  # the last train step
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no ./mlruns
    mlflow.set_tracking_uri(None)


def test_tokens_per_s_counts_the_time_since_the_previous_record(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import peftkit.train.reporting.metrics as report
    from peftkit.train.checkpoints.rundir import RunDir

    clock = iter([10.0, 11.0, 12.5, 14.5, 14.6])  # created; eval written 11.0-12.5; the step ends at 14.5
    monkeypatch.setattr(report, "time", SimpleNamespace(perf_counter=lambda: next(clock)))  # this module's clock
    metrics = report.Metrics(RunDir(tmp_path), enabled=True)
    metrics.write("eval", {"step": 0, "loss": 1.0})
    metrics.write("train", {"step": 1, "loss": 0.9, "step_tokens": 300})
    assert metrics.read()[1]["tokens_per_s"] == 150.0  # 300 tokens in the 2 s after the eval was written
