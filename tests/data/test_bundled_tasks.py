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
                                               ("make_intent_dataset.py", ("intent_train.jsonl", "intent_eval.jsonl"))])
def test_scripts_regenerate_the_committed_files(tmp_path, script, files):
    subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--out", str(tmp_path)], check=True,
                   capture_output=True, timeout=60)
    for name in files:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), f"{name} differs from {script}'s output"


def test_intent_held_out_split_shares_no_product_or_wording_with_training():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_intent_dataset as intent
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    intent.check_disjoint()
    train = [json.loads(line) for line in (DATA / "intent_train.jsonl").read_text().splitlines()]
    held_out = [json.loads(line) for line in (DATA / "intent_eval.jsonl").read_text().splitlines()]
    assert len(train) == 1500 and len(held_out) == 60
    assert len({r["input"] for r in held_out}) == 60 and not {r["input"] for r in train} & {r["input"] for r in held_out}
    for row in held_out:
        assert not any(product in row["input"] for product in intent.PRODUCTS_TRAIN)
    labels = set(intent.TEMPLATES)
    for rows in (train, held_out):  # every label, equally often
        assert {r["output"] for r in rows} == labels
        assert len({sum(r["output"] == label for r in rows) for label in labels}) == 1


def test_general_text_sample_is_plain_text_rows():
    rows = [json.loads(line) for line in (DATA / "general_text.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(set(r) == {"text"} and len(r["text"].split()) > 40 for r in rows)
