"""A method defined outside peftkit is a method like the built-ins: examples/ln_tuning_plugin (LayerNorm tuning as
HF PEFT 0.21.2 has it, LN_TUNING) is found through its `peftkit.methods` entry point, listed, trained by
`peftkit train --method ln_tuning`, estimated, saved, loaded back by peftkit and by HF PEFT, loaded from PEFT's
files, and merged as PEFT merges it.

Nothing is pip-installed: the entry-point test puts the example and a `*.dist-info` folder holding its
entry_points.txt on the PYTHONPATH of a fresh interpreter (importlib.metadata finds distributions on sys.path);
the other tests register the plugin in this process with `peftkit.register_method` and restore the registry after.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LNTuningConfig as PeftLNTuningConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import peftkit
from peftkit.core import registry
from peftkit.errors import PeftkitError
from peftkit.memory import estimate_memory
from tests.tiny import logits, save_tiny_checkpoint, tiny_config, tiny_input, tiny_model, write_rows

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "ln_tuning_plugin"


@pytest.fixture
def ln_tuning(monkeypatch):
    """The plugin's module, its method registered in this process; the registry is restored afterwards."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    registry.method_names()  # built-ins (and installed plugins) first
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    import peftkit_ln_tuning

    peftkit.register_method(peftkit_ln_tuning.LNTuningMethod)
    return peftkit_ln_tuning


def trained_like(model: torch.nn.Module, seed: int = 3) -> None:
    """Move every trained norm weight away from its start, as training would (an untouched copy would hide a lost
    tensor or a norm that was not swapped in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * 0.2)


def dist_info(site: Path, entry_points: str) -> Path:
    """A minimal installed-distribution record on `site` whose entry_points.txt is `entry_points`."""
    info = site / "peftkit_ln_tuning-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: peftkit-ln-tuning\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(entry_points)
    return site


def test_entry_point_plugin_is_listed_and_trains_through_the_cli(tmp_path):
    """A fresh interpreter lists ln_tuning from the entry point, skips a broken plugin with one warning line naming
    it, and `peftkit train --method ln_tuning` trains two steps and saves a PEFT LN_TUNING adapter."""
    site = dist_info(tmp_path / "site", "[peftkit.methods]\nln_tuning = peftkit_ln_tuning:LNTuningMethod\n"
                                        "broken = no_such_module_xyz:Method\n")
    model_dir, data = save_tiny_checkpoint(tmp_path / "tiny"), write_rows(tmp_path / "d.jsonl", 8)
    script = ("import sys; from peftkit.core.registry import method_names; print('methods:', method_names()); "
              "from peftkit.cli import main; main(sys.argv[1:])")
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--method", "ln_tuning", "--max-steps", "2",
            "--batch-size", "4", "--max-length", "64", "--precision", "fp32", "--eval-split", "0",
            "--output", str(tmp_path / "run")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(EXAMPLE), str(site)]), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'ln_tuning'" in out.stdout.splitlines()[0]
    broken = [line for line in out.stderr.splitlines() if "broken" in line]
    assert len(broken) == 1 and "no_such_module_xyz" in broken[0], out.stderr[-3000:]
    saved = tmp_path / "run" / "adapter"
    assert json.loads((saved / "adapter_config.json").read_text())["peft_type"] == "LN_TUNING"
    weights = load_file(saved / "adapter_model.safetensors")
    assert len(weights) == 2 * 2 + 1 and any((w != 1).any() for w in weights.values())  # 2 layers x 2 norms + final: trained


def test_estimate_counts_what_inject_creates(ln_tuning):
    config = tiny_config("llama")
    est = estimate_memory(config, "ln_tuning", precision="fp32", seq_len=32)
    model = tiny_model("llama")
    peftkit.inject(model, ln_tuning.LNTuningConfig())
    assert est.trainable_params == peftkit.trainable_parameters(model)[0] == (2 * 2 + 1) * 32  # norms of hidden 32
    lora = estimate_memory(config, "lora", precision="fp32", seq_len=32)
    assert est.breakdown["activations"] != lora.breakdown["activations"]  # its own hook, not LoRA's or nothing
    with pytest.raises(PeftkitError, match="does not apply to method 'ln_tuning'") as err:
        estimate_memory(config, "ln_tuning", r=8)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])  # gpt2: LayerNorm with a bias
def test_saves_and_loads_in_peftkit_and_peft(ln_tuning, tmp_path, kind):
    model, ids = tiny_model(kind), tiny_input()
    peftkit.inject(model, ln_tuning.LNTuningConfig())
    trained_like(model)
    ours = logits(model, ids)
    assert (ours - logits(tiny_model(kind), ids)).abs().max() > 1e-3
    peftkit.save_adapter(model, tmp_path / "ad")
    again = peftkit.load_adapter(tiny_model(kind), tmp_path / "ad")
    assert torch.equal(logits(again, ids), ours)
    theirs = PeftModel.from_pretrained(tiny_model(kind), tmp_path / "ad")
    assert (logits(theirs, ids) - ours).abs().max() <= 1e-5
    saved = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert sum(1 for n, _ in theirs.named_parameters() if "ln_tuning_layers" in n) == len(saved)


def test_loads_peft_saved_ln_tuning(ln_tuning, tmp_path):
    ids = tiny_input()
    peft_model = get_peft_model(tiny_model("llama"), PeftLNTuningConfig(task_type="CAUSAL_LM"))
    trained_like(peft_model)
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    model = peftkit.load_adapter(tiny_model("llama"), tmp_path / "peft")
    assert (logits(model, ids) - expected).abs().max() <= 1e-5


def test_merge_equals_peft_merge_and_unload(ln_tuning, tmp_path):
    model, ids = tiny_model("gpt2"), tiny_input()
    peftkit.inject(model, ln_tuning.LNTuningConfig())
    trained_like(model)
    peftkit.save_adapter(model, tmp_path / "ad")
    unmerged = logits(model, ids)
    merged = peftkit.merge(model)
    theirs = PeftModel.from_pretrained(tiny_model("gpt2"), tmp_path / "ad").merge_and_unload()
    ours_state, their_state = merged.state_dict(), theirs.state_dict()
    assert ours_state.keys() == their_state.keys()
    assert all(torch.equal(ours_state[k], their_state[k]) for k in ours_state)
    assert torch.equal(logits(merged, ids), unmerged)


def test_register_method_refuses_a_taken_name_or_a_non_method(ln_tuning):
    assert "ln_tuning" in registry.method_names()
    for bad, message in ((ln_tuning.LNTuningMethod, "already registered"), (ln_tuning.LNTuningConfig, "not a peftkit Method")):
        with pytest.raises(PeftkitError, match=message) as err:
            peftkit.register_method(bad)
        assert "\n" not in str(err.value)
