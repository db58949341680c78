"""`model.save_pretrained` of an adapted model writes the active adapter (what save_adapter writes), from the first
injected adapter until the last one is merged or deleted; then it is HF's own method again."""

import copy
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import peftkit
from peftkit import LoraConfig, PeftkitError
from tests.tiny import logits, perturb_adapter, tiny_input, tiny_model

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "peftkit.json"]


def _adapted(**options):
    model = tiny_model("llama")
    peftkit.inject(model, LoraConfig(r=4, lora_alpha=8, **options))
    perturb_adapter(model)
    return model


def _hooked(model) -> bool:
    return "save_pretrained" in model.__dict__


def test_writes_exactly_what_save_adapter_writes(tmp_path):
    model = _adapted()
    # the keyword arguments HF's Trainer and other callers pass are accepted and ignored
    model.save_pretrained(tmp_path / "hf", state_dict=model.state_dict(), safe_serialization=True,
                          max_shard_size="1GB", save_embedding_layers=False)
    peftkit.save_adapter(model, tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ADAPTER_FILES  # no temporary left behind
    for name in ADAPTER_FILES:
        assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "ours" / name).read_bytes(), name
    ids = tiny_input()
    theirs = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "hf")
    assert (logits(theirs, ids) - logits(model, ids)).abs().max() <= 1e-5


def test_writes_into_a_folder_with_other_files_like_hf(tmp_path):
    model = _adapted()
    folder = tmp_path / "out"
    (folder / "checkpoint-1").mkdir(parents=True)
    (folder / "tokenizer.json").write_text("{}")
    model.save_pretrained(folder)
    model.save_pretrained(str(folder))  # again, over its own files
    assert sorted(p.name for p in folder.iterdir()) == sorted([*ADAPTER_FILES, "checkpoint-1", "tokenizer.json"])


def test_non_main_process_writes_nothing_and_push_to_hub_is_refused(tmp_path):
    model = _adapted()
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    model.save_pretrained(tmp_path / "rank1b", False)  # positional, as HF's signature allows
    assert not (tmp_path / "rank1").exists() and not (tmp_path / "rank1b").exists()
    with pytest.raises(PeftkitError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(PeftkitError, match="is a file"):
        model.save_pretrained(tmp_path / "file")


def test_saves_the_active_adapter(tmp_path):
    model = _adapted(target_modules=["q_proj"])
    peftkit.inject(model, LoraConfig(r=2, target_modules=["v_proj"]), name="second")
    model.save_pretrained(tmp_path / "a")
    assert '"v_proj"' in (tmp_path / "a" / "adapter_config.json").read_text()
    peftkit.set_adapter(model, "default")
    model.save_pretrained(tmp_path / "b")
    assert '"q_proj"' in (tmp_path / "b" / "adapter_config.json").read_text()


def test_hook_lives_from_first_adapter_to_last(tmp_path):
    model = tiny_model("llama")
    assert not _hooked(model)
    peftkit.inject(model, LoraConfig(r=2))
    peftkit.inject(model, LoraConfig(r=2), name="other")
    peftkit.delete_adapter(model, "default")
    assert _hooked(model)
    peftkit.delete_adapter(model, "other")
    assert not _hooked(model)
    peftkit.save_adapter(_adapted(), tmp_path / "ad")
    peftkit.load_adapter(model, tmp_path / "ad")
    assert _hooked(model)


def test_after_merge_the_model_saves_as_a_plain_model(tmp_path):
    model, ids = _adapted(), tiny_input()
    expected = logits(model, ids)
    peftkit.merge(model)
    assert not _hooked(model)
    model.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (logits(loaded, ids) - expected).abs().max() <= 1e-5


def test_copies_save_themselves(tmp_path):
    model, ids = _adapted(), tiny_input()
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert copied.save_pretrained.model is copied
        with torch.no_grad():
            next(p for n, p in copied.named_parameters() if "lora_B" in n).add_(1.0)
        copied.save_pretrained(tmp_path / "copy")
        loaded = peftkit.load_adapter(tiny_model("llama"), tmp_path / "copy")
        assert (logits(loaded, ids) - logits(copied, ids)).abs().max() <= 1e-5


QUICK_START_PRELUDE = """
import sys
import peftkit
from tests.tiny import tiny_model
model = tiny_model("llama")
peftkit.inject(model, peftkit.LoraConfig(r=2))
assert "peftkit.io.adapters" not in sys.modules  # nothing imported the writer's module yet
model.save_pretrained("first")                      # the Trainer's save_model does exactly this
assert sorted(p.name for p in __import__("pathlib").Path("first").iterdir()) == %r
"""


def _readme_quick_start() -> str:
    """The README's first Python block, up to its QLoRA lines (they name a hub model this test may not fetch)."""
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    return block.split("# QLoRA", 1)[0]


def test_readme_quick_start_in_a_fresh_interpreter(tmp_path):
    """`model.save_pretrained` right after `inject` in a new process (nothing else imported), then the README's quick
    start exactly: the save must not depend on which peftkit modules happen to be imported."""
    script = QUICK_START_PRELUDE % ADAPTER_FILES + _readme_quick_start()
    repo = Path(__file__).parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name for p in (tmp_path / "out" / "adapter").iterdir()} >= set(ADAPTER_FILES)
