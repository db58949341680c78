"""The second adversarial pass's cases, in-process: a link planted at the GGUF export's temporary name, an export
into the folder it reads, a full disk and a SIGTERM while `convert` and `export` write over an earlier result (kept
whole, nothing left beside it), and a ship job's log swapped for a link. Each CLI case ends in one `error:` line."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest

import peftkit
import peftkit.io.adapters as adapters_io
from peftkit.cli import Terminated
from tests.cli_errors import cli_error_line
from tests.tiny import perturb_adapter, tiny_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    base = root / "base"
    tiny_model("llama").save_pretrained(base)
    model = tiny_model("llama")
    peftkit.inject(model, peftkit.LoraConfig(r=2))
    perturb_adapter(model)
    peftkit.save_adapter(model, root / "adapter")
    return root / "adapter", base


def _digest(path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()


def _commands(files, tmp_path) -> dict[str, list[str]]:
    adapter, base = files
    return {"convert": ["convert", str(adapter), "--base", str(base), "--rank", "2", "-o", str(tmp_path / "lora")],
            "export": ["export", str(adapter), "--base", str(base), "-o", str(tmp_path / "a.gguf")]}


def test_a_link_planted_at_the_export_temporary_is_not_written_through(files, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (tmp_path / f".a.gguf.tmp-{os.getpid()}").symlink_to(victim)  # the name the export used to write to
    from peftkit.cli import main

    main(_commands(files, tmp_path)["export"])
    assert victim.read_text() == "keep" and (tmp_path / "a.gguf").read_bytes()[:4] == b"GGUF"


def test_export_into_the_folder_it_reads_is_refused(files, capsys):
    adapter, base = files
    for inside in (adapter, base):
        line = cli_error_line(["export", str(adapter), "--base", str(base), "-o", str(inside / "x.gguf")], capsys)
        assert "overlaps the input" in line and not (inside / "x.gguf").exists()


def _fail_in_write(monkeypatch, command: str, fault: BaseException) -> None:
    def fail(*args, **kwargs):
        raise fault

    if command == "convert":
        monkeypatch.setattr(adapters_io, "save_tensors", fail)
    else:
        import gguf

        monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)


@pytest.mark.parametrize("fault", ["full disk", "SIGTERM"])
@pytest.mark.parametrize("command", ["convert", "export"])
def test_a_fault_while_writing_keeps_the_earlier_result(files, tmp_path, capsys, monkeypatch, command, fault):
    from peftkit.cli import main

    argv = _commands(files, tmp_path)[command]
    main(argv)
    output = tmp_path / argv[-1]
    before = _digest(output)
    _fail_in_write(monkeypatch, command, OSError(errno.ENOSPC, "No space left on device") if fault == "full disk"
                   else Terminated())
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--overwrite"])
    err = capsys.readouterr().err
    assert exc.value.code == (2 if fault == "full disk" else 143) and "Traceback" not in err, err
    assert ("No space left" if fault == "full disk" else "terminated (SIGTERM)") in err
    assert _digest(output) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [output.name]  # no temporary left beside it


def test_a_ship_job_log_swapped_for_a_link_is_not_streamed(tmp_path):
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from peftkit.ui.server import make_app

    root = (tmp_path / "runs").resolve()
    http = TestClient(make_app(root, token="t"), base_url="http://127.0.0.1:7860")
    (tmp_path / "secret").write_text("secret line\n")
    jobs = root / ".peftkit-ui" / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "0123456789ab.log").symlink_to(tmp_path / "secret")
    answer = http.get("/api/jobs/0123456789ab/events")
    assert "secret" not in answer.text


@pytest.mark.parametrize("given", [False, [1], "beta=1"])
def test_objective_options_of_the_wrong_type_beside_a_flat_option(given):
    """Found by the fuzz suite: a recipe's `objective_options: false` beside `beta: 0` was a TypeError."""
    from peftkit.errors import PeftkitError
    from peftkit.train.config import load_train_config

    with pytest.raises(PeftkitError, match="objective_options must be a mapping") as exc:
        load_train_config(None, {"objective": "dpo", "objective_options": given, "beta": 0})
    assert "\n" not in str(exc.value)


DEEP = "[" * 100_000 + "]" * 100_000  # nested deeper than Python's JSON reader goes: a RecursionError


@pytest.mark.parametrize("edit", ["deep", "huge r"])
def test_json_nested_too_deep_or_numbers_too_big_are_one_line(files, tmp_path, capsys, edit):
    import json
    import shutil

    adapter, _ = files
    shutil.copytree(adapter, tmp_path / "a")
    config = tmp_path / "a" / "adapter_config.json"
    config.write_text(DEEP if edit == "deep" else json.dumps({**json.loads(config.read_text()), "r": 10**400}))
    for argv in (["check", str(tmp_path / "a")],
                 ["combine", "-a", str(tmp_path / "a"), "-a", str(adapter), "-o", str(tmp_path / "o")]):
        if edit == "deep" or argv[0] == "combine":  # check reports a huge r as an adapter no one loads (exit 3)
            line = cli_error_line(argv, capsys)
            assert ("nests deeper" if edit == "deep" else "rank must be") in line


def test_json_lines_nested_too_deep(tmp_path):
    from peftkit.data import load_rows
    from peftkit.errors import PeftkitError
    from peftkit.train.reporting.metrics import read_records
    from peftkit.ui.runs import read_metrics

    file = tmp_path / "rows.jsonl"
    file.write_text('{"kind": "train", "step": 1}\n{"x": ' + DEEP + "}\n")
    with pytest.raises(PeftkitError, match="line 2 nests deeper"):
        load_rows(str(file))
    with pytest.raises(PeftkitError, match="line 2 is damaged"):
        read_records(file)
    assert [r["step"] for r in read_metrics(file.resolve())[0]] == [1]
