"""Every `--json` output is strict JSON (RFC 8259 has no NaN / Infinity): a non-finite number prints as null."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

import peftkit.cli.compress as compress_cli
import peftkit.cli.estimate as estimate_cli
import peftkit.cli.merge as merge_cli
from peftkit.cli import main
from peftkit.cli._options import print_json, strict_json
from peftkit.merging.compress import CompressReport, ModuleRow
from peftkit.merging.stream import MergeReport
from tests.merging.fixtures import save_base, save_lora
from tests.tiny import save_tiny_checkpoint, write_rows


def _refuse(constant: str):
    raise AssertionError(f"not strict JSON: {constant}")


def strict_loads(text: str):
    """json.loads that fails on the NaN / Infinity / -Infinity extensions Python's json writes by default."""
    return json.loads(text, parse_constant=_refuse)


def cli_json(capsys, argv: list[str]):
    capsys.readouterr()
    main(argv)
    return strict_loads(capsys.readouterr().out)


def test_print_json_replaces_non_finite_numbers(capsys):
    value = {"a": math.nan, "b": [1.5, math.inf, (-math.inf, 2)], "c": {"d": "nan", "e": 3, "f": None, "g": True}}
    assert strict_json(value) == {"a": None, "b": [1.5, None, [None, 2]], "c": {"d": "nan", "e": 3, "f": None, "g": True}}
    print_json(value)
    assert strict_loads(capsys.readouterr().out) == strict_json(value)


def test_eval_json_of_a_nan_model_is_strict(tmp_path, capsys):
    folder = save_tiny_checkpoint(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(folder)
    data = write_rows(tmp_path / "eval.jsonl", 2)
    result = cli_json(capsys, ["eval", "--json", "--model", str(folder), "--data", str(data), "--max-examples", "2"])
    assert result["loss"] is None and result["perplexity"] is None and result["n_examples"] == 2


def test_merge_and_compress_json_print_null_for_nan(monkeypatch, tmp_path, capsys):
    report = MergeReport(output="o", base_folder="b", worst_relative_error=math.nan, logits_max_abs_diff=math.inf)
    monkeypatch.setattr(merge_cli, "merge_to_disk", lambda *a, **k: report)
    got = cli_json(capsys, ["merge", "-a", "x", "-o", str(tmp_path / "o"), "--json"])
    assert got["worst_relative_error"] is None and got["logits_max_abs_diff"] is None and got["output"] == "o"

    compressed = CompressReport(rows=[ModuleRow("m", (4, 4), 2, math.nan, 0.5)], total_rel_error=math.nan,
                                other=[{"tensor": "t", "rel_change": math.inf, "kept": False}])
    monkeypatch.setattr(compress_cli, "compress", lambda *a, **k: compressed)
    got = cli_json(capsys, ["compress", "--finetuned", "ft", "-o", str(tmp_path / "a"), "--rank", "2", "--json"])
    assert got["total_rel_error"] is None and got["rows"][0]["rel_error"] is None and got["rows"][0]["shape"] == [4, 4]
    assert got["other"][0]["rel_change"] is None


def test_estimate_json_prints_null_for_nan(monkeypatch, capsys):
    est = SimpleNamespace(to_dict=lambda: {"total_bytes": 1e9, "fits": None, "max_seq_len": math.inf, "x": [math.nan]})
    monkeypatch.setattr(estimate_cli, "estimate_memory", lambda *a, **k: est)
    got = cli_json(capsys, ["estimate", "--model", "qwen1.5-7b", "--json"])
    assert got == {"total_bytes": 1e9, "fits": None, "max_seq_len": None, "x": [None]}
    assert isinstance(cli_json(capsys, ["estimate", "--list", "--json"]), dict)


@pytest.mark.parametrize("command", ["merge", "combine"])
def test_real_merge_and_combine_json_is_strict(tmp_path, capsys, command):
    adapter = save_lora("llama", tmp_path / "adapter")
    if command == "merge":
        args = ["merge", "--base", str(save_base("llama", tmp_path / "base")), "-a", str(adapter)]
    else:
        args = ["combine", "-a", str(adapter), "-a", str(adapter), "--combination", "svd", "--rank", "2"]
    got = cli_json(capsys, [*args, "-o", str(tmp_path / "out"), "--json"])
    assert got["output"] == str(tmp_path / "out")
