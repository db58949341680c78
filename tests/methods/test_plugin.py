"""A method defined outside peftkit is a method like the built-ins: examples/ia3_plugin (IA3 as HF PEFT 0.21.2 has
it) is found through its `peftkit.methods` entry point, listed, trained by `peftkit train --method ia3`, estimated,
saved, loaded back by peftkit and by HF PEFT, loaded from PEFT's files, and merged as PEFT merges it.

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
from peft import IA3Config as PeftIA3Config
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import peftkit
from peftkit.core import registry
from peftkit.errors import PeftkitError
from peftkit.memory import estimate_memory
from tests.tiny import logits, save_tiny_checkpoint, tiny_config, tiny_input, tiny_model, write_rows

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "ia3_plugin"


@pytest.fixture
def ia3(monkeypatch):
    """The plugin's module, its method registered in this process; the registry is restored afterwards."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    registry.method_names()  # built-ins (and installed plugins) first
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    import peftkit_ia3

    peftkit.register_method(peftkit_ia3.IA3Method)
    return peftkit_ia3


def trained_like(model: torch.nn.Module, seed: int = 3) -> None:
    """Move every IA3 vector away from ones, as training would (ones would hide a wrong axis or a lost tensor)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.2)


def dist_info(site: Path, entry_points: str) -> Path:
    """A minimal installed-distribution record on `site` whose entry_points.txt is `entry_points`."""
    info = site / "peftkit_ia3-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: peftkit-ia3\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(entry_points)
    return site


def test_entry_point_plugin_is_listed_and_trains_through_the_cli(tmp_path):
    """A fresh interpreter lists ia3 from the entry point, skips a broken plugin with one warning line naming it,
    and `peftkit train --method ia3` trains two steps and saves a PEFT IA3 adapter."""
    site = dist_info(tmp_path / "site", "[peftkit.methods]\nia3 = peftkit_ia3:IA3Method\n"
                                        "broken = no_such_module_xyz:Method\n")
    model_dir, data = save_tiny_checkpoint(tmp_path / "tiny"), write_rows(tmp_path / "d.jsonl", 8)
    script = ("import sys; from peftkit.core.registry import method_names; print('methods:', method_names()); "
              "from peftkit.cli import main; main(sys.argv[1:])")
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--method", "ia3", "--max-steps", "2",
            "--batch-size", "4", "--max-length", "64", "--precision", "fp32", "--eval-split", "0",
            "--output", str(tmp_path / "run")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(EXAMPLE), str(site)]), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'ia3'" in out.stdout.splitlines()[0]
    broken = [line for line in out.stderr.splitlines() if "broken" in line]
    assert len(broken) == 1 and "no_such_module_xyz" in broken[0], out.stderr[-3000:]
    saved = tmp_path / "run" / "adapter"
    assert json.loads((saved / "adapter_config.json").read_text())["peft_type"] == "IA3"
    vectors = load_file(saved / "adapter_model.safetensors")
    assert len(vectors) == 2 * 3 and any((v != 1).any() for v in vectors.values())  # 2 layers x k, v, down: trained


def test_estimate_counts_what_inject_creates(ia3):
    config = tiny_config("llama")
    est = estimate_memory(config, "ia3", precision="fp32", seq_len=32)
    model = tiny_model("llama")
    peftkit.inject(model, ia3.IA3Config())
    assert est.trainable_params == peftkit.trainable_parameters(model)[0] == 2 * (16 + 16 + 64)  # k, v out; down in
    lora = estimate_memory(config, "lora", precision="fp32", seq_len=32)
    assert est.breakdown["activations"] != lora.breakdown["activations"]  # its own hook, not LoRA's or nothing
    with pytest.raises(PeftkitError, match="does not apply to method 'ia3'") as err:
        estimate_memory(config, "ia3", r=8)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: q / v with biases, which IA3 scales on merge
def test_saves_and_loads_in_peftkit_and_peft(ia3, tmp_path, kind):
    model, ids = tiny_model(kind), tiny_input()
    peftkit.inject(model, ia3.IA3Config())
    trained_like(model)
    ours = logits(model, ids)
    peftkit.save_adapter(model, tmp_path / "ad")
    again = peftkit.load_adapter(tiny_model(kind), tmp_path / "ad")
    assert torch.equal(logits(again, ids), ours)
    theirs = PeftModel.from_pretrained(tiny_model(kind), tmp_path / "ad")
    assert (logits(theirs, ids) - ours).abs().max() <= 1e-5
    assert sum(1 for n, _ in theirs.named_parameters() if "ia3_l" in n) == len(load_file(tmp_path / "ad" / "adapter_model.safetensors"))


def test_loads_peft_saved_ia3(ia3, tmp_path):
    ids = tiny_input()
    peft_model = get_peft_model(tiny_model("llama"), PeftIA3Config(task_type="CAUSAL_LM"))
    trained_like(peft_model)
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    model = peftkit.load_adapter(tiny_model("llama"), tmp_path / "peft")
    assert (logits(model, ids) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_merge_equals_peft_merge_and_unload(ia3, tmp_path, kind):
    model, ids = tiny_model(kind), tiny_input()
    peftkit.inject(model, ia3.IA3Config())
    trained_like(model)
    peftkit.save_adapter(model, tmp_path / "ad")
    unmerged = logits(model, ids)
    merged = peftkit.merge(model)
    theirs = PeftModel.from_pretrained(tiny_model(kind), tmp_path / "ad").merge_and_unload()
    ours_state, their_state = merged.state_dict(), theirs.state_dict()
    assert ours_state.keys() == their_state.keys()
    assert all(torch.equal(ours_state[k], their_state[k]) for k in ours_state)
    assert (logits(merged, ids) - unmerged).abs().max() <= 1e-5


def test_register_method_refuses_a_taken_name_or_a_non_method(ia3):
    assert "ia3" in registry.method_names()
    for bad, message in ((ia3.IA3Method, "already registered"), (ia3.IA3Config, "not a peftkit Method")):
        with pytest.raises(PeftkitError, match=message) as err:
            peftkit.register_method(bad)
        assert "\n" not in str(err.value)
