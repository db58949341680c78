"""The bundled tasks are what their scripts generate, and their held-out splits are disjoint by construction."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "peftkit" / "data"


@pytest.mark.parametrize(("script", "files"), [("make_dataset.py", ("task_train.jsonl", "task_eval.jsonl")),
                                               ("make_arith_dataset.py", ("arith_train.jsonl", "arith_eval.jsonl"))])
def test_scripts_regenerate_the_committed_files(tmp_path, script, files):
    subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name in files:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), f"{name} differs from {script}'s output"


def test_arith_held_out_split_shares_no_name_object_or_problem_with_training():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_arith_dataset as arith
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    arith.check_disjoint()
    train = [json.loads(line) for line in (DATA / "arith_train.jsonl").read_text().splitlines()]
    held_out = [json.loads(line) for line in (DATA / "arith_eval.jsonl").read_text().splitlines()]
    assert len(train) == 1500 and len(held_out) == 100
    assert not {r["input"] for r in train} & {r["input"] for r in held_out}
    for row in held_out:
        assert not any(name in row["input"] for name in arith.NAMES_TRAIN)
        assert not any(f" {obj}" in row["input"] for obj in arith.OBJECTS_TRAIN)
    assert all(r["output"].isdigit() for r in train + held_out)  # answers are whole numbers >= 0


def test_general_text_sample_is_plain_text_rows():
    rows = [json.loads(line) for line in (DATA / "general_text.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(set(r) == {"text"} and len(r["text"].split()) > 40 for r in rows)
