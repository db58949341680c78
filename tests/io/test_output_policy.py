"""The output-folder policy and the faults of the machine, tried as a hostile or careless user would: peftkit never
replaces what it did not write nor an input it reads, never writes outside its target, and a full disk, a signal or
a vanished folder end in one line with nothing half-written left behind."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from peftkit.cli import main
from peftkit.errors import PeftkitError
from peftkit.io.fs import MARKER_NAME, atomic_dir
from peftkit.io.outputs import check_output
from tests.merging.fixtures import save_base, save_lora

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy")
    return {"base": save_base("llama", root / "base"), "adapter": save_lora("llama", root / "adapter")}


def run(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    return exit_info.value.code, err


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def merge_args(files, out):
    return ["merge", "--base", str(files["base"]), "-a", str(files["adapter"]), "-o", str(out)]


@pytest.mark.parametrize("where", ["cwd", "home", "root", "parent_of_cwd"])
def test_protected_places_are_refused(where, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = {"cwd": ".", "home": str(Path.home()), "root": "/", "parent_of_cwd": ".."}[where]
    with pytest.raises(PeftkitError, match="working directory|home directory|filesystem root"):
        check_output(target, overwrite=True)


def test_train_overwrite_of_the_working_directory_deletes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    code, err = run(["train", "--overwrite", "-o", ".", "--max-steps", "1"], capsys)
    assert code == 2 and err.count("\n") == 1 and "working directory" in err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_merge_over_its_base_or_beside_inputs_is_refused(files, tmp_path, capsys):
    base_files = sorted(p.name for p in files["base"].iterdir())
    for target in (files["base"], files["base"].parent, files["adapter"] / "inner"):
        code, err = run([*merge_args(files, target), "--overwrite"], capsys)
        assert code == 2 and "overlaps the input" in err, err
    assert sorted(p.name for p in files["base"].iterdir()) == base_files


def test_compress_over_the_finetune_it_reads_is_refused(files, capsys):
    code, err = run(["compress", "--base", str(files["base"]), "--finetuned", str(files["base"]), "--rank", "2",
                     "-o", str(files["base"]), "--overwrite"], capsys)
    assert code == 2 and "overlaps the input" in err


def test_overwrite_replaces_only_peftkit_outputs(files, tmp_path, capsys):
    out = tmp_path / "combined"
    out.mkdir()
    (out / "data.csv").write_text("1,2")
    args = ["combine", "-a", str(files["adapter"]), "-a", str(files["adapter"]), "-o", str(out), "--overwrite"]
    code, err = run(args, capsys)
    assert code == 2 and "did not write" in err and (out / "data.csv").read_text() == "1,2"
    (out / "data.csv").unlink()
    main(args)
    assert (out / MARKER_NAME).is_file() and json.loads((out / MARKER_NAME).read_text())["command"] == "combine"
    main(args)  # its own output: replaced
    assert (out / "adapter_config.json").is_file() and leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["below_a_file", "dangling_symlink", "file"])
def test_bad_targets_are_one_line_and_leave_nothing(kind, files, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    target = {"below_a_file": tmp_path / "file" / "out", "file": tmp_path / "file",
              "dangling_symlink": tmp_path / "link"}[kind]
    if kind == "dangling_symlink":
        target.symlink_to(tmp_path / "nowhere")
    code, err = run([*merge_args(files, target), "--overwrite"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert leftovers(tmp_path) == [] and (tmp_path / "file").read_text() == "x"


def test_index_naming_a_file_outside_the_folder_is_refused(files, tmp_path, capsys):
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"precious")
    base = tmp_path / "evil_base"
    save_base("llama", base, shard="20KB")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = str(victim)  # an absolute path; "../victim.safetensors" is refused the same way
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    code, err = run(["merge", "--base", str(base), "-a", str(files["adapter"]), "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "not a plain file name" in err
    assert victim.read_bytes() == b"precious" and not (tmp_path / "o").exists()


def test_full_disk_is_one_line_exit_2_and_cleans_up(files, tmp_path, capsys, monkeypatch):
    import peftkit.merging.stream as stream

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stream, "copy_aux_files", full)
    code, err = run(merge_args(files, tmp_path / "out"), capsys)
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err and "free some space" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def _mounted_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


def test_real_full_disk_on_a_1mb_tmpfs(files, tmp_path):
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not _mounted_tmpfs(disk, "1m"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * (free - 8192))  # 8 KB left: the merged shard (~70 KB) cannot fit
        done = subprocess.run([sys.executable, "-m", "peftkit.cli", *merge_args(files, disk / "out")],
                              capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().count("\n") == 0 and "No space left on device" in done.stderr
        assert not (disk / "out").exists() and leftovers(disk) == []
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


SLOW_MERGE = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even when a background job's runner ignores it
import peftkit.merging.stream as stream
real = stream._write_shard
def slow(*args, **kwargs):
    print("writing", flush=True)
    time.sleep(30)
    return real(*args, **kwargs)
stream._write_shard = slow
from peftkit.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_signal_during_merge_exits_with_its_code_and_cleans_up(sig, code, word, files, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, *merge_args(files, tmp_path / "out")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.strip().splitlines() == [err.strip()] and word in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_stale_temporaries_of_a_killed_run_are_removed(files, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    stale = tmp_path / f".out.tmp-{dead.pid}-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    alive = tmp_path / f".out.tmp-{os.getpid()}-cafecafe"  # a live process's temporary is left alone
    alive.mkdir()
    main([*merge_args(files, tmp_path / "out"), "--json"])
    capsys.readouterr()
    assert not stale.exists() and alive.exists() and (tmp_path / "out" / "config.json").is_file()


def test_atomic_dir_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    target = tmp_path / "result"
    with atomic_dir(target, command="test") as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target, command="test") as tmp:
        (tmp / "a.txt").write_text("new")
        raise RuntimeError("failed halfway")
    assert (target / "a.txt").read_text() == "old" and leftovers(tmp_path) == []


def test_atomic_dir_never_replaces_a_foreign_folder(tmp_path):
    target = tmp_path / "users"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    with pytest.raises(PeftkitError, match="did not write"), atomic_dir(target) as tmp:
        (tmp / "x").write_text("y")
    assert (target / "thesis.tex").read_text() == "years of work" and leftovers(tmp_path) == []


def test_sigkill_leftover_is_cleaned_by_the_next_write(tmp_path):
    script = textwrap.dedent(f"""
        import os, time
        from peftkit.io.fs import atomic_dir
        with atomic_dir({str(tmp_path / 'r')!r}) as tmp:
            (tmp / "half").write_bytes(b"0" * 1000)
            print("inside", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "inside"
    proc.kill()
    proc.wait()
    assert len(leftovers(tmp_path)) == 1
    deadline = time.time() + 5
    while time.time() < deadline and os.path.exists(f"/proc/{proc.pid}"):
        time.sleep(0.05)
    with atomic_dir(tmp_path / "r") as tmp:
        (tmp / "done").write_text("ok")
    assert leftovers(tmp_path) == [] and (tmp_path / "r" / "done").is_file()
