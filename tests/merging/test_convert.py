"""convert: an adapter of any mergeable method -> a plain LoRA by SVD of each module's weight delta, through the
registry only. DoRA at full rank reproduces its logits and HF PEFT loads the result; at low rank the energy reported
is what the written LoRA keeps; IA3 converts too (convert names no method); a full fine-tune's folder
goes through compress; `check` prints a command that works; bad input is one line and exit code 2."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from peft import PeftModel

import peftkit
from peftkit.cli import main
from peftkit.core.state import set_base_model
from peftkit.export.portability import check_portability
from peftkit.merging.convert import convert
from tests.tiny import logits, perturb_adapter, tiny_input, tiny_model


@pytest.fixture(scope="module")
def dora(tmp_path_factory):
    """(folder, the DoRA model): a tiny Llama base saved, and a trained-like DoRA adapter over it that records it."""
    tmp = tmp_path_factory.mktemp("convert")
    tiny_model("llama").save_pretrained(tmp / "base")
    model = peftkit.inject(tiny_model("llama"), peftkit.LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    perturb_adapter(model)
    set_base_model(model, str(tmp / "base"), None)
    peftkit.save_adapter(model, tmp / "dora")
    return tmp, model


def folded_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """{module: the adapter's weight delta}, from peftkit's own merge (another path than convert's)."""
    merged = dict(peftkit.merge(peftkit.load_adapter(tiny_model("llama"), adapter)).named_parameters())
    return {name.removesuffix(".weight"): (merged[name] - p).detach()
            for name, p in tiny_model("llama").named_parameters() if not torch.equal(merged[name], p)}


def test_dora_at_full_rank_is_the_same_model_in_peftkit_and_hf_peft(dora):
    tmp, model = dora
    report = convert(str(tmp / "dora"), str(tmp / "full"), rank=10_000, size_cap=False)
    assert len(report.rows) == 14 and all(r.energy > 1 - 1e-6 and r.rel_error < 1e-3 for r in report.rows)
    config = json.loads((tmp / "full" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not config["use_dora"] and config["r"] == config["lora_alpha"] == 32
    assert config["base_model_name_or_path"] == str(tmp / "base")  # the base the DoRA adapter recorded
    ids = tiny_input()
    expected = logits(model, ids)
    assert (logits(peftkit.load_adapter(tiny_model("llama"), tmp / "full"), ids) - expected).abs().max() <= 1e-4
    in_peft = PeftModel.from_pretrained(tiny_model("llama"), tmp / "full").eval()
    assert (logits(in_peft, ids) - expected).abs().max() <= 1e-4


def test_low_rank_reports_the_energy_the_lora_keeps(dora):
    tmp, _ = dora
    report = convert(str(tmp / "dora"), str(tmp / "r8"), base=str(tmp / "base"), rank=8)  # svd.py: exact from 8 of 32
    lora = peftkit.load_adapter(tiny_model("llama"), tmp / "r8")
    deltas = folded_deltas(tmp / "dora")
    assert {r.module for r in report.rows} == set(deltas)
    for row in report.rows:
        delta = deltas[row.module]
        kept = lora.get_submodule(row.module).delta_weight("default")
        assert row.rank == 8 and 0.3 < row.energy < 0.99
        assert abs(float(kept.pow(2).sum() / delta.pow(2).sum()) - row.energy) <= 1e-4  # what the file carries
        best = torch.linalg.svdvals(delta).pow(2)
        assert abs(row.energy - float(best[:8].sum() / best.sum())) <= 1e-4  # the best rank-8 fit's (Eckart-Young)


def test_energy_picks_the_smallest_rank_per_module(dora):
    tmp, _ = dora
    report = convert(str(tmp / "dora"), str(tmp / "e90"), energy=0.9)
    assert len({r.rank for r in report.rows}) > 1  # chosen per module
    deltas = folded_deltas(tmp / "dora")
    for row in report.rows:
        s2 = torch.linalg.svdvals(deltas[row.module]).pow(2)
        share = torch.cumsum(s2, 0) / s2.sum()
        assert row.energy >= 0.9 > float(share[row.rank - 2]) and abs(row.energy - float(share[row.rank - 1])) <= 1e-4


@pytest.mark.parametrize("method", ["ia3", "vera", "lokr", "loha", "oft"])
def test_every_mergeable_method_converts_without_being_named(dora, tmp_path, method):
    """Any registered mergeable method converts through the same path: its adapter, folded one layer at a time."""
    tmp, _ = dora
    from peftkit.core.registry import get_method

    model = peftkit.inject(tiny_model("llama"), get_method(method).build_config({}))
    perturb_adapter(model, scale=0.2)
    set_base_model(model, str(tmp / "base"), None)
    peftkit.save_adapter(model, tmp_path / method)
    report = convert(str(tmp_path / method), str(tmp_path / "lora"), rank=10_000, size_cap=False)
    assert report.source == f"{method} adapter" and report.rows and all(r.energy > 1 - 1e-6 for r in report.rows)
    ids = tiny_input()
    got = logits(peftkit.load_adapter(tiny_model("llama"), tmp_path / "lora"), ids)
    assert (got - logits(model, ids)).abs().max() <= 1e-4
    assert (logits(model, ids) - logits(tiny_model("llama"), ids)).abs().max() > 1e-3  # the adapter changes the model


def test_a_full_finetune_goes_through_compress_with_its_recorded_base(dora, tmp_path):
    tmp, _ = dora
    tiny_model("llama", seed=1).save_pretrained(tmp_path / "ft")
    (tmp_path / "ft" / "peftkit.json").write_text(json.dumps({"base_model_name_or_path": str(tmp / "base")}))
    report = convert(str(tmp_path / "ft"), str(tmp_path / "lora"), rank=3)
    assert report.source == "full fine-tune" and {r.rank for r in report.rows} == {3} and report.other


def test_check_prints_a_convert_command_that_works(dora, capsys):
    tmp, _ = dora
    command = check_portability(tmp / "dora").convert_command
    assert command == f"peftkit convert {tmp / 'dora'} --to lora --rank 16 -o {tmp / 'dora-lora'}"
    main(shlex.split(command)[1:])
    assert "energy kept" in capsys.readouterr().out
    assert check_portability(tmp / "dora-lora").convert_command is None and check_portability(tmp / "dora-lora").all_load


@pytest.mark.parametrize("args, message", [
    (["--rank", "0"], "--rank must be a positive integer, got 0"),
    (["--energy", "1.5"], "--energy must be in (0, 1]"),
    (["--rank", "4", "--to", "gguf"], "--to must be one of lora"),
    (["--rank", "4", "--base", "/no/such/base"], "base model '/no/such/base' is neither a folder"),
    (["--rank", "4", "PREFIX"], "a prefix adapter cannot be converted to a LoRA"),
])
def test_bad_input_is_one_line_and_exit_code_2(dora, capsys, args, message):
    tmp, _ = dora
    if "PREFIX" in args:
        peftkit.save_adapter(peftkit.inject(tiny_model("llama"), peftkit.PrefixConfig(num_virtual_tokens=2)), tmp / "prefix")
        args = [a if a != "PREFIX" else str(tmp / "prefix") for a in args]
    source = [] if str(tmp / "prefix") in args else [str(tmp / "dora")]
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["convert", *source, *args, "-o", str(tmp / "bad")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and err.count("\n") == 1 and err.startswith("error: ")
    assert not (tmp / "bad").exists()


def test_a_full_disk_is_one_line_and_leaves_no_output(dora, capsys, monkeypatch):
    """safetensors reports a full disk as its own SafetensorError: it must reach the user as the CLI's line (exit 2),
    not a traceback, with nothing half-written."""
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    tmp, _ = dora
    monkeypatch.setattr("safetensors.torch.save_file", full)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["convert", str(tmp / "dora"), "--rank", "4", "-o", str(tmp / "full-disk")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: No space left on device") and len(err.splitlines()) == 1
    assert not (tmp / "full-disk").exists()
