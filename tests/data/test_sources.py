"""load_rows (every source kind and every bad input) and format detection."""

from __future__ import annotations

import json

import datasets
import pytest

from peftkit.data import detect_format, load_rows
from peftkit.data.formats import check_format
from peftkit.errors import PeftkitError

ROWS = [{"instruction": "Add", "input": "1 2", "output": "3"}, {"instruction": "Sub", "input": "", "output": "0"}]


def _error(call, *args) -> str:
    with pytest.raises(PeftkitError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    return message


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_each_file_kind_loads(tmp_path):
    frame = datasets.Dataset.from_list(ROWS).to_pandas()
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    frame.to_csv(tmp_path / "a.csv", index=False)
    frame.to_parquet(tmp_path / "a.parquet")
    sources = [_jsonl(tmp_path / "a.jsonl", ROWS)] + [str(tmp_path / f"a.{ext}") for ext in ("json", "csv", "parquet")]
    for source in sources:
        rows = load_rows(source)
        assert len(rows) == 2 and detect_format(rows.column_names) == "alpaca", source
        assert rows[0]["output"] == "3" or rows[0]["output"] == 3  # csv infers ints


def test_save_to_disk_folders(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    assert len(load_rows(str(tmp_path / "one"))) == 2
    both = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                                 "test": datasets.Dataset.from_list(ROWS[:1])})
    both.save_to_disk(str(tmp_path / "dict"))
    assert len(load_rows(str(tmp_path / "dict"))) == 2
    assert len(load_rows(str(tmp_path / "dict"), split="test")) == 1
    assert "has no split 'dev'" in _error(load_rows, str(tmp_path / "dict"), "dev")
    (tmp_path / "plain").mkdir()
    assert "save_to_disk" in _error(load_rows, str(tmp_path / "plain"))


def test_missing_empty_and_unsupported_files(tmp_path):
    assert "does not exist" in _error(load_rows, str(tmp_path / "nope.jsonl"))
    assert "does not exist" in _error(load_rows, "./data/train.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    assert "empty" in _error(load_rows, str(tmp_path / "empty.jsonl"))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    assert "empty" in _error(load_rows, str(tmp_path / "blank.jsonl"))
    (tmp_path / "header.csv").write_text("instruction,output\n")
    assert "empty" in _error(load_rows, str(tmp_path / "header.csv"))
    (tmp_path / "rows.txt").write_text("hello\n")
    message = _error(load_rows, str(tmp_path / "rows.txt"))
    assert "unsupported extension '.txt'" in message and ".jsonl" in message


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"instruction": "x", "output": \n' + json.dumps(ROWS[1]) + "\n")
    assert "line 3 is not valid JSON" in _error(load_rows, str(path))
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    assert "line 2 is a JSON list" in _error(load_rows, str(path))


def test_hub_name_offline_is_a_clear_error():
    # conftest sets HF_HUB_OFFLINE=1: a hub name must fail with our one-line error, not a traceback
    message = _error(load_rows, "nobody/no-such-dataset")
    assert "nobody/no-such-dataset" in message and "Hugging Face Hub" in message


def test_detect_format():
    assert detect_format(["instruction", "input", "output"]) == "alpaca"
    assert detect_format(["instruction", "output", "text"]) == "alpaca"
    assert detect_format(["messages"]) == "messages"
    assert detect_format(["id", "conversations"]) == "messages"
    assert detect_format(["text", "meta"]) == "text"
    message = _error(detect_format, ["question", "answer"])
    assert "'question'" in message and "'answer'" in message


def test_explicit_format_must_have_its_columns():
    assert check_format("auto", ["text"]) == "text"
    assert "needs the column(s) ['instruction', 'output']" in _error(check_format, "alpaca", ["text"])
    assert "unknown data format" in _error(check_format, "sharegpt", ["text"])
