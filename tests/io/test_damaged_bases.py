"""Damaged or mismatched bases and adapters end in one `error:` line naming the file, exit code 2, before any work:
a corrupt or truncated safetensors file (generate, merge --base, compress --finetuned), adapters of different
hidden sizes (combine, merge), a GGUF export against another base; and `peftkit check` applies PEFT's own rules
for target_modules before it says "HF PEFT: yes"."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import peftkit
from peftkit.cli import main
from peftkit.export.portability import check_portability
from tests.cli_errors import cli_error_line
from tests.tiny import SMALL, WIDE, save_tiny_checkpoint, tiny_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    base = save_tiny_checkpoint(root / "base")
    for name in ("narrow", "wide"):
        model = tiny_model("llama", WIDE if name == "wide" else SMALL)
        peftkit.inject(model, peftkit.LoraConfig(r=2))
        peftkit.save_adapter(model, root / name)
    tiny_model("llama", WIDE).save_pretrained(root / "wide_base")
    return root, base


@pytest.mark.parametrize("damage", ["header", "truncated"])
def test_a_damaged_weights_file_is_named(files, tmp_path, capsys, damage):
    root, base = files
    bad = tmp_path / "bad"
    shutil.copytree(base, bad)
    weights = bad / "model.safetensors"
    if damage == "header":
        data = bytearray(weights.read_bytes())
        data[8:20] = b'{"garbage":['
        weights.write_bytes(bytes(data))
    else:
        os.truncate(weights, weights.stat().st_size // 2)
    for argv in (["generate", "hi", "--model", str(bad)],
                 ["merge", "-a", str(root / "narrow"), "--base", str(bad), "-o", str(tmp_path / "m")],
                 ["compress", "--finetuned", str(bad), "--base", str(base), "--rank", "2", "-o", str(tmp_path / "c")]):
        message = cli_error_line(argv, capsys)
        assert str(weights) in message and "damaged" in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # nothing written


def test_adapters_of_different_hidden_sizes_are_refused(files, tmp_path, capsys):
    root, base = files
    for argv in (["combine", "-a", str(root / "narrow"), "-a", str(root / "wide"), "-o", str(tmp_path / "c")],
                 ["merge", "-a", str(root / "narrow"), "-a", str(root / "wide"), "--base", str(base), "-o",
                  str(tmp_path / "m")]):
        message = cli_error_line(argv, capsys)
        assert "do not fit one base" in message and "32x32" in message and "64x64" in message, message


def test_export_checks_the_shapes_against_the_base(files, tmp_path, capsys):
    root, base = files
    message = cli_error_line(["export", str(root / "narrow"), "--base", str(root / "wide_base"), "-o",
                      str(tmp_path / "x.gguf")], capsys)
    assert "32x32 weight but the base's is 64x64" in message
    assert not (tmp_path / "x.gguf").exists()
    main(["export", str(root / "narrow"), "--base", str(base), "-o", str(tmp_path / "y.gguf")])
    assert (tmp_path / "y.gguf").stat().st_size > 0


@pytest.mark.parametrize("targets,reason", [(["nothing_here"], "selects none"), (5, "PEFT needs a list"),
                                            ({"q_proj": 1}, "PEFT needs a list"), ("(", "not a valid regular"),
                                            (["q_proj"], "does not select"), (None, None), (["q_proj", "v_proj"], None),
                                            (r".*\.(q|v)_proj", None)])
def test_check_applies_peft_target_rules(files, tmp_path, targets, reason):
    root, _ = files
    adapter = tmp_path / "a"
    shutil.copytree(root / "narrow", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "target_modules": targets}))
    verdict = next(v for v in check_portability(adapter).verdicts if v.consumer == "HF PEFT")
    if reason is None:
        assert verdict.status == "yes", verdict
    else:
        assert verdict.status == "no" and any(reason in r for r in verdict.reasons), verdict
