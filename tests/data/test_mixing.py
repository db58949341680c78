"""Column mapping and weighted mixtures of several sources (peftkit/data/mixing.py)."""

from __future__ import annotations

import json
from collections import Counter

import datasets
import pytest

from peftkit.data import detect_format, load_mixture
from peftkit.data.mixing import Source, map_columns, mixture_text, parse_mixture
from peftkit.errors import PeftkitError


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _rows(tag: str, n: int) -> list[dict]:
    return [{"question": f"{tag} q{i}", "answer": f"{tag} a{i}"} for i in range(n)]


def test_parse_mixture_forms(tmp_path):
    assert parse_mixture("a.jsonl") == [Source("a.jsonl")]
    assert parse_mixture("a.jsonl:0.7, b.jsonl:0.3") == [Source("a.jsonl", 0.7), Source("b.jsonl", 0.3)]
    assert parse_mixture(["a.jsonl", {"path": "b.jsonl"}]) == [Source("a.jsonl"), Source("b.jsonl")]
    assert parse_mixture([{"path": "a.jsonl", "weight": 2}, "b.jsonl:1"]) == [Source("a.jsonl", 2.0),
                                                                              Source("b.jsonl", 1.0)]
    odd = tmp_path / "v1,v2:3"  # an existing path is one source, whatever it contains
    odd.write_text("")
    assert parse_mixture(str(odd)) == [Source(str(odd))]
    assert mixture_text([{"path": "a.jsonl", "weight": 0.7}, {"path": "b.jsonl", "weight": 0.3}]) == \
        "a.jsonl:0.7,b.jsonl:0.3"
    assert mixture_text("a.jsonl") == "a.jsonl" and mixture_text(None) is None


@pytest.mark.parametrize("spec, message", [
    ("a.jsonl:0.7,b.jsonl", "give a weight to every source"),
    ("a.jsonl:0,b.jsonl:1", "weight of 'a.jsonl' must be a positive number"),
    ([{"path": "a.jsonl", "weight": "x"}], "must be a positive number"),
    ([{"file": "a.jsonl"}], r"each source is a path or \{path: ..., weight: ...\}"),
    ([3], "each source is a path"),
    ([], "no source given"),
])
def test_bad_mixtures(spec, message):
    with pytest.raises(PeftkitError, match=message):
        parse_mixture(spec)


def test_columns_map_before_detection():
    rows = datasets.Dataset.from_list(_rows("x", 2))
    mapped = map_columns(rows, {"instruction": "question", "output": "answer"}, "d.jsonl")
    assert mapped.column_names == ["instruction", "output"] and mapped[0] == {"instruction": "x q0", "output": "x a0"}
    assert detect_format(mapped.column_names) == "alpaca"
    as_pc = map_columns(rows, {"prompt": "question", "completion": "answer"}, "d.jsonl")
    assert detect_format(as_pc.column_names) == "prompt_completion"
    both = datasets.Dataset.from_list([{"output": "old", "answer": "new", "instruction": "i"}])
    assert map_columns(both, {"output": "answer"}, "d")[0] == {"output": "new", "instruction": "i"}
    assert map_columns(rows, {}, "d") is rows


def test_column_mapping_errors_name_the_columns():
    rows = datasets.Dataset.from_list(_rows("x", 1))
    with pytest.raises(PeftkitError, match="instruction <- 'query', but 'd.jsonl' has no column 'query'; its columns "
                                           "are question, answer"):
        map_columns(rows, {"instruction": "query"}, "'d.jsonl'")
    with pytest.raises(PeftkitError, match="'instr' is not a column peftkit reads"):
        map_columns(rows, {"instr": "question"}, "d")


def test_weighted_mixture_takes_the_shares_and_is_seeded(tmp_path):
    a, b = _jsonl(tmp_path / "a.jsonl", _rows("a", 30)), _jsonl(tmp_path / "b.jsonl", _rows("b", 10))
    mixed = load_mixture(f"{a}:0.25,{b}:0.75", seed=1)
    counts = Counter(q.split()[0] for q in mixed["question"])
    assert counts == {"a": 10, "b": 30}  # 40 rows in all: a gives 10 of its 30, b all 10 three times
    assert Counter(q for q in mixed["question"] if q.startswith("b")) == {f"b q{i}": 3 for i in range(10)}
    assert len({q for q in mixed["question"] if q.startswith("a")}) == 10  # a: without replacement
    assert load_mixture(f"{a}:0.25,{b}:0.75", seed=1)["question"] == mixed["question"]
    assert load_mixture(f"{a}:0.25,{b}:0.75", seed=2)["question"] != mixed["question"]


def test_unweighted_sources_are_concatenated_with_the_mapping(tmp_path):
    a, b = _jsonl(tmp_path / "a.jsonl", _rows("a", 3)), _jsonl(tmp_path / "b.jsonl", _rows("b", 2))
    mixed = load_mixture([a, b], columns={"instruction": "question", "output": "answer"})
    assert mixed.column_names == ["instruction", "output"] and len(mixed) == 5
    assert mixed["instruction"] == ["a q0", "a q1", "a q2", "b q0", "b q1"]


def test_sources_with_different_columns_are_refused(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", _rows("a", 2))
    b = _jsonl(tmp_path / "b.jsonl", [{"text": "hello"}])
    with pytest.raises(PeftkitError, match="need the same columns.*has question, answer.*has text"):
        load_mixture(f"{a},{b}")


def test_column_order_and_empty_columns_align_but_types_must_match(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"output": "a", "instruction": "b", "input": None}])
    b = _jsonl(tmp_path / "b.jsonl", [{"instruction": "c", "input": "x", "output": "d"}])
    assert list(load_mixture(f"{a},{b}")) == [{"output": "a", "instruction": "b", "input": None},
                                              {"output": "d", "instruction": "c", "input": "x"}]
    c = _jsonl(tmp_path / "c.jsonl", [{"instruction": "c", "input": "x", "output": 5}])
    with pytest.raises(PeftkitError, match="columns of different types"):
        load_mixture(f"{b}:1,{c}:1")
