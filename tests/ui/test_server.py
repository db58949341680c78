"""The page's server without a browser: it says what the CLI says, refuses what the CLI refuses with the same line,
and keeps to its user (loopback hosts, its token, no cross-site writes, paths under the runs root)."""

from __future__ import annotations

import json
import os
import time

import pytest

pytest.importorskip("starlette")
from starlette.testclient import TestClient

from peftkit.cli import main
from peftkit.ui.runs import Runs
from peftkit.ui.server import make_app

TOKEN = "test-token"
LOCAL = "http://127.0.0.1:7860"


@pytest.fixture
def client(tmp_path):
    root = tmp_path / "runs"
    return TestClient(make_app(root, token=TOKEN), base_url=LOCAL), root


def post(client, path, body, **headers):
    return client.post(path, json=body, headers={"X-Peftkit-Token": TOKEN, **headers})


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_shows_the_cli_command_and_its_recipe(client, capsys):
    http, _ = client
    form = {"rank": "4", "lr": "0.001", "max_steps": "7", "packing": True, "set": "use_rslora=true"}
    plan = post(http, "/api/plan", {"form": form}).json()
    assert plan["command"] == "peftkit train --rank 4 --packing --lr 0.001 --max-steps 7 --set use_rslora=true"
    code, out, err = cli(capsys, *plan["argv"][1:], "--print-config")
    assert code == 0, err
    assert plan["recipe"] == out  # the recipe is what --print-config prints for that command
    assert plan["estimate"]["trainable_params"] > 0 and len(plan["estimate"]["gpus"]) == 3
    first = plan["preview"]["examples"][0][0]["runs"]
    assert [trained for _, trained in first][:2] == [False, True]  # the prompt masked, the answer trained
    assert "<|im_start|>assistant" in first[0][0] and first[1][0].startswith("name=")


@pytest.mark.parametrize("form, field, argv", [
    ({"rank": "0"}, "rank", ["--rank", "0"]),
    ({"lr": "-1"}, "lr", ["--lr", "-1"]),
    ({"objective": "nope"}, "objective", ["--objective", "nope"]),
    ({"beta": "0.2"}, "beta", ["--beta", "0.2"]),
])
def test_bad_values_give_the_cli_line_next_to_their_field(client, capsys, form, field, argv):
    http, _ = client
    response = post(http, "/api/plan", {"form": form})
    code, _, err = cli(capsys, "train", *argv, "--print-config")
    assert response.status_code == 400 and code == 2
    assert "error: " + response.json()["error"] == err.strip()
    assert response.json()["field"] == field


def test_a_malformed_data_file_is_refused_before_launch_with_the_cli_line(client, capsys):
    http, root = client
    bad = root / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    response = post(http, "/api/runs", {"name": "r", "form": {"data": "bad.jsonl"}})
    code, _, err = cli(capsys, "train", "--data", str(bad), "--dry-run")
    assert response.status_code == 400 and code == 2
    assert "error: " + response.json()["error"] == err.strip()
    assert response.json()["field"] == "data"
    assert not (root / "r").exists() and not (root / ".peftkit-ui" / "r.json").exists()  # nothing started


@pytest.mark.parametrize("value", ["../outside.jsonl", "/etc/passwd", "~/x.jsonl", "link/secret.jsonl"])
def test_paths_stay_under_the_root(client, tmp_path, value):
    http, root = client
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.jsonl").write_text('{"text": "x"}\n')
    os.symlink(tmp_path / "outside", root / "link")
    response = post(http, "/api/plan", {"form": {"data": value}})
    assert response.status_code == 400
    assert "outside the runs root" in response.json()["error"] or "not one under ~" in response.json()["error"]


def test_only_this_page_may_change_anything(client):
    http, _ = client
    assert http.post("/api/plan", json={"form": {}}).status_code == 403  # no token header
    assert post(http, "/api/plan", {"form": {}}, origin="http://evil.example").status_code == 403
    assert http.get("/", headers={"host": "evil.example"}).status_code == 403  # DNS rebinding
    for host in ("evil.com:80@127.0.0.1", "127.0.0.1@evil.com", "[::1", "localhost.", "127.0.0.2", "[::ffff:127.0.0.1]"):
        assert http.get("/api/runs", headers={"host": host}).status_code == 403, host
    for host in ("127.0.0.1:7860", "[::1]:7860", "LOCALHOST", "localhost:1"):
        assert http.get("/api/runs", headers={"host": host}).status_code == 200, host
    assert post(http, "/api/runs/x/stop", {}, **{"X-Peftkit-Token": "wrong"}).status_code == 403


def test_a_non_local_server_needs_its_token(tmp_path):
    http = TestClient(make_app(tmp_path, token=TOKEN, local=False), base_url="http://10.1.2.3:7860")
    assert http.get("/").status_code == 401 and http.get("/api/runs").status_code == 401
    assert http.get(f"/?token={TOKEN}").status_code == 200  # sets the cookie the page's own requests carry
    assert http.get("/api/runs").status_code == 200


def test_uploads_are_written_whole_and_never_replace_a_file(client):
    http, root = client
    headers = {"X-Peftkit-Token": TOKEN}
    made = http.post("/api/upload?name=rows.jsonl", content=b'{"text": "hi"}\n', headers=headers)
    assert made.json() == {"path": "uploads/rows.jsonl"}
    assert (root / "uploads" / "rows.jsonl").read_bytes() == b'{"text": "hi"}\n'
    again = http.post("/api/upload?name=rows.jsonl", content=b"other", headers=headers)
    assert again.status_code == 400 and "already exists" in again.json()["error"]
    assert (root / "uploads" / "rows.jsonl").read_bytes() == b'{"text": "hi"}\n'
    assert http.post("/api/upload?name=../x.jsonl", content=b"x", headers=headers).status_code == 400
    assert sorted(p.name for p in (root / "uploads").iterdir()) == ["rows.jsonl"]  # no partial file left


def test_uploads_stay_under_the_root_and_a_full_disk_is_one_line(client, tmp_path, monkeypatch):
    http, root = client
    headers = {"X-Peftkit-Token": TOKEN}
    (tmp_path / "elsewhere").mkdir()
    (root / "uploads").symlink_to(tmp_path / "elsewhere")  # uploads/ pointing out of the root
    refused = http.post("/api/upload?name=a.jsonl", content=b"x\n", headers=headers)
    assert refused.status_code == 400 and "plain folder" in refused.json()["error"]
    assert list((tmp_path / "elsewhere").iterdir()) == []
    (root / "uploads").unlink()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("peftkit.ui.ship.os.link", full)
    failed = http.post("/api/upload?name=b.jsonl", content=b"x\n", headers=headers)
    assert failed.status_code == 400 and "No space left" in failed.json()["error"]
    assert list((root / "uploads").iterdir()) == []  # no partial file left


@pytest.mark.parametrize("path, body", [("/api/runs", '{"name": "x", "form": [1]}'),
                                        ("/api/runs", '{"name": "x", "form": "abc"}'),
                                        ("/api/plan", '{"form": ' + "[" * 10_000 + "]" * 10_000 + "}")],
                         ids=["form-list", "form-text", "nested-deep"])
def test_malformed_bodies_are_one_line_not_a_server_error(client, path, body):
    http, root = client
    answer = http.post(path, content=body, headers={"X-Peftkit-Token": TOKEN, "content-type": "application/json"})
    assert answer.status_code == 400 and answer.json()["error"], answer.text
    assert not (root / "x").exists() and not (root / ".peftkit-ui").exists()  # nothing launched


def test_a_run_folder_shows_nothing_from_outside_the_root(client, tmp_path):
    http, root = client
    (root / "damaged").mkdir()
    (root / "damaged" / "summary.json").write_bytes(b"{bad\xff")
    damaged = http.get("/api/runs/damaged/evaluation")
    assert damaged.status_code == 400 and "is not valid JSON" in damaged.json()["error"]
    (tmp_path / "secret.json").write_text('{"secret": 1}')
    (root / "linked").mkdir()
    (root / "linked" / "summary.json").symlink_to(tmp_path / "secret.json")
    linked = http.get("/api/runs/linked/evaluation")
    assert linked.status_code == 400 and "outside the runs root" in linked.json()["error"]


@pytest.mark.parametrize("argv", [["peftkit", "train", "--output", "OUTSIDE"],
                                  ["peftkit", "train", "--output", "RUN", "--output", "OUTSIDE"],
                                  ["peftkit", "train", "--output", "RUN", "-oOUTSIDE"],
                                  ["peftkit", "train", "--output=OUTSIDE"]])
def test_a_forged_run_record_cannot_send_a_resumed_run_outside_the_root(client, tmp_path, argv):
    http, root = client
    places = {"RUN": str(root / "r"), "OUTSIDE": str(tmp_path / "outside")}
    argv = [places.get(a, a.replace("OUTSIDE", places["OUTSIDE"])) for a in argv]
    (root / ".peftkit-ui").mkdir()
    (root / ".peftkit-ui" / "r.json").write_text(json.dumps({"pid": 1, "argv": argv, "exit_code": 1}))
    refused = post(http, "/api/runs/r/resume", {})
    assert refused.status_code == 400 and "does not write to" in refused.json()["error"]
    assert not (tmp_path / "outside").exists() and not (root / ".peftkit-ui" / "r.log").exists()  # nothing started


def test_a_fifo_in_a_run_folder_does_not_block_the_server(tmp_path):
    import threading

    (tmp_path / "r").mkdir()
    os.mkfifo(tmp_path / "r" / "metrics.jsonl")
    os.mkfifo(tmp_path / "r" / "run_config.yaml")
    answer: list = []
    reader = threading.Thread(target=lambda: answer.append(Runs(tmp_path).status("r")), daemon=True)
    reader.start()
    reader.join(10)  # a blocked open() never returns
    assert answer and answer[0]["step"] == 0 and answer[0]["method"] is None


def test_a_run_that_fails_shows_the_cli_error_line(tmp_path):
    runs = Runs(tmp_path)
    runs.launch("broken", ["peftkit", "train", "--model", str(tmp_path / "missing"), "--output",
                           str(tmp_path / "broken")])
    for _ in range(600):
        status = runs.status("broken")
        if status["status"] != "running":
            break
        time.sleep(0.1)
    assert status["status"] == "failed", status
    assert status["error"].startswith("error: model path") and "does not exist" in status["error"]
    assert Runs(tmp_path).status("broken")["status"] == "failed"  # another server (a restart) sees the same
    with pytest.raises(Exception, match="run name"):
        runs.folder("../up")
    for _ in range(100):  # the server's reaper records the exit code once it has waited for the process
        recorded = json.loads((tmp_path / ".peftkit-ui" / "broken.json").read_text())["exit_code"]
        if recorded is not None:
            break
        time.sleep(0.1)
    assert recorded == 2


def test_ship_converts_a_finished_runs_dora_adapter_with_the_cli_command(client, tmp_path):
    """A finished run (its folder as the trainer leaves it) with a DoRA adapter over a tiny base: the Convert job
    runs `peftkit convert ... --base` and writes a LoRA beside the run; its output streams; a bad action is one line."""
    import peftkit
    from peftkit.core.state import set_base_model
    from tests.tiny import perturb_adapter, tiny_model

    http, root = client
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    run = root / "dora-run"
    model = peftkit.inject(tiny_model("llama"), peftkit.LoraConfig(r=2, use_dora=True))
    perturb_adapter(model)
    set_base_model(model, str(base), None)
    peftkit.save_adapter(model, run / "adapter")
    (run / "run_config.yaml").write_text(f"model: {base}\nmethod: lora\nmax_steps: 2\n")
    (run / "summary.json").write_text("{}")
    job = post(http, "/api/ship", {"run": "dora-run", "action": "convert"}).json()
    assert job["command"].startswith(f"peftkit convert {run / 'adapter'} --to lora --rank 16 --output ")
    assert job["argv"][-2:] == ["--base", str(base)]
    with http.stream("GET", f"/api/jobs/{job['job']}/events") as events:
        text = "".join(events.iter_text())
    assert 'event: end\ndata: {"code": 0}' in text, text[-2000:]
    assert (root / "dora-run-lora" / "adapter_model.safetensors").is_file()
    refused = post(http, "/api/ship", {"run": "dora-run", "action": "compress"})
    assert refused.status_code == 400 and "a whole model (full / freeze)" in refused.json()["error"]


def test_columns_lists_a_files_columns_for_the_mapping(client):
    http, root = client
    (root / "qa.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    got = post(http, "/api/columns", {"data": "qa.jsonl"}).json()
    assert got["sources"] == [{"source": str(root / "qa.jsonl"), "columns": ["question", "answer"]}]
    assert {"instruction", "output", "messages"} <= set(got["known"])
    assert post(http, "/api/columns", {"data": "../x.jsonl"}).status_code == 400
