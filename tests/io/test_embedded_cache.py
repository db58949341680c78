"""The cache of the embedded model records the size of every file it writes and is converted again when a file is
missing, truncated or changed in size, or its weights' header is damaged; a cache written before sizes were recorded
is checked once and then recorded. The conversion itself (~30 s) is replaced by a small stand-in writing the same
kind of folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import peftkit.io.models as models
from peftkit.io.fs import atomic_dir
from peftkit.io.gguf import CONVERSION_FILE, damaged_files, write_conversion_version


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """(the cache folder, the list of conversions run)."""
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    conversions: list[str] = []

    def convert(gguf, folder):
        conversions.append(str(folder))
        with atomic_dir(folder, command="convert") as tmp:
            (tmp / "config.json").write_text('{"model_type": "llama"}')
            (tmp / "tokenizer.json").write_text('{"version": "1.0"}')
            save_file({"w": torch.ones(64)}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            write_conversion_version(tmp, "stand-in.gguf")

    monkeypatch.setattr(models, "convert_gguf", convert)
    monkeypatch.setattr(models, "embedded_gguf", lambda: tmp_path / "stand-in.gguf")
    return tmp_path / "smollm2-135m-instruct", conversions


def test_sizes_are_recorded_and_a_sound_cache_is_reused(cache):
    folder, conversions = cache
    assert models.embedded_folder() == folder and len(conversions) == 1
    recorded = json.loads((folder / CONVERSION_FILE).read_text())["files"]
    assert set(recorded) >= {"config.json", "tokenizer.json", "model.safetensors"} and damaged_files(folder) == []
    models.embedded_folder()
    assert len(conversions) == 1


@pytest.mark.parametrize("damage", ["truncate weights", "corrupt header", "delete tokenizer", "grow config"])
def test_a_damaged_cache_is_converted_again(cache, caplog, damage):
    folder, conversions = cache
    models.embedded_folder()
    weights = folder / "model.safetensors"
    if damage == "truncate weights":
        weights.write_bytes(weights.read_bytes()[:-40])
    elif damage == "corrupt header":
        data = bytearray(weights.read_bytes())
        data[8:12] = b"!!!!"
        weights.write_bytes(bytes(data))
    elif damage == "delete tokenizer":
        (folder / "tokenizer.json").unlink()
    else:
        (folder / "config.json").write_text('{"model_type": "llama", "x": 1}')
    with caplog.at_level("WARNING", logger="peftkit.io.models"):
        models.embedded_folder()
    assert len(conversions) == 2 and "converting it again" in caplog.text
    assert damaged_files(folder) == [] and (folder / "tokenizer.json").is_file()


def test_a_cache_without_recorded_sizes_is_checked_then_recorded(cache):
    folder, conversions = cache
    models.embedded_folder()
    record = json.loads((folder / CONVERSION_FILE).read_text())
    (folder / CONVERSION_FILE).write_text(json.dumps({k: v for k, v in record.items() if k != "files"}))
    assert damaged_files(folder) is None
    models.embedded_folder()
    assert len(conversions) == 1 and damaged_files(folder) == []
