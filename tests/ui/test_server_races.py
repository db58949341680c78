"""The page's server against an unlucky user and a local attacker: a --root that is a file, a run that does not
exist, and files of a run folder swapped for links or FIFOs between the server's check and its open."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("starlette")
from starlette.testclient import TestClient

from peftkit.ui import server
from peftkit.ui.runs import Runs, read_metrics
from peftkit.ui.security import open_regular
from peftkit.ui.server import make_app
from tests.cli_errors import cli_error_line

TOKEN = "test-token"


@pytest.fixture
def client(tmp_path):
    root = (tmp_path / "runs").resolve()
    return TestClient(make_app(root, token=TOKEN), base_url="http://127.0.0.1:7860"), root


def test_a_root_that_is_a_file_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for root in (tmp_path / "file", tmp_path / "file" / "below"):
        line = cli_error_line(["ui", "--root", str(root)], capsys)
        assert "is a file" in line and "give a folder" in line and "File exists" not in line, line


def test_a_run_that_does_not_exist_is_not_found(client):
    http, root = client
    for answer in (http.get("/api/runs/ghost/events"), http.get("/api/runs/ghost/evaluation"),
                   http.post("/api/chat", json={"run": "ghost", "prompt": "hi"}, headers={"X-Peftkit-Token": TOKEN}),
                   http.post("/api/ship", json={"run": "ghost", "action": "merge"}, headers={"X-Peftkit-Token": TOKEN})):
        assert answer.status_code in (400, 404), answer.text
        assert "not found" in answer.json()["error"] or "no evaluation" in answer.json()["error"], answer.text
    with pytest.raises(Exception, match="not found"):
        Runs(root).status("ghost")
    (root / "stopped").mkdir()
    assert Runs(root).status("stopped")["status"] == "stopped"  # a folder without a record is a run


def test_open_regular_checks_the_opened_file(tmp_path):
    root = tmp_path.resolve()
    (root / "real").mkdir()
    (root / "real" / "f").write_text("ok")
    (root / "secret").write_text("secret")
    (root / "link").symlink_to(root / "secret")
    (root / "linked_dir").symlink_to(root / "real")
    os.mkfifo(root / "fifo")
    with open_regular(root / "real" / "f") as f:
        assert f.read() == b"ok"
    for refused in ("link", "linked_dir/f", "fifo", "missing", "real"):
        assert open_regular(root / refused) is None, refused


def test_a_link_swapped_in_after_the_check_is_not_served(client, tmp_path, monkeypatch):
    """The evaluation's summary.json passes the `inside` check as a regular file, then becomes a link to a file
    outside the root before it is opened (the race the check alone leaves open)."""
    http, root = client
    (tmp_path / "secret.json").write_text('{"secret": 1}')
    (root / "r").mkdir()
    summary = root / "r" / "summary.json"
    summary.write_text('{"loss": 1}')
    checked = server.inside

    def check_then_swap(*args):
        result = checked(*args)
        summary.unlink()
        summary.symlink_to(tmp_path / "secret.json")
        return result

    monkeypatch.setattr(server, "inside", check_then_swap)
    answer = http.get("/api/runs/r/evaluation")
    assert answer.status_code == 400 and "secret" not in answer.text, answer.text


def test_run_files_swapped_for_links_are_not_read(tmp_path):
    root = tmp_path.resolve()
    (root / "secret.jsonl").write_text('{"kind": "train", "step": 99, "loss": 1.0}\n')
    (root / "r").mkdir()
    (root / "r" / "metrics.jsonl").symlink_to(root / "secret.jsonl")
    (root / "r" / "run_config.yaml").symlink_to("/dev/zero")
    (root / ".peftkit-ui").mkdir()
    (root / ".peftkit-ui" / "r.log").symlink_to("/dev/zero")
    assert read_metrics(root / "r" / "metrics.jsonl") == ([], 0)
    status = Runs(root).status("r")
    assert status["step"] == 0 and status["config"] == {} and status["status"] == "stopped"


def test_an_uploads_folder_swapped_for_a_link_mid_upload_is_not_written_through(tmp_path):
    """The folder is checked when the upload starts; an attacker then renames it and puts a link to a folder
    outside the root in its place while the data streams in. The file still lands in the folder that was checked."""
    import asyncio

    from peftkit.ui.ship import Jobs

    root = (tmp_path / "runs").resolve()
    (root / "uploads").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()

    async def chunks():
        (root / "uploads").rename(root / "checked")
        (root / "uploads").symlink_to(tmp_path / "elsewhere")
        yield b'{"text": "hi"}\n'

    asyncio.run(Jobs(root).save_upload("rows.jsonl", chunks()))
    assert list((tmp_path / "elsewhere").iterdir()) == []
    assert [p.name for p in (root / "checked").iterdir()] == ["rows.jsonl"]
