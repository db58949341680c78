"""Property-based fuzzing of what users hand peftkit: training configs, adapter configs, data rows, estimator
options. Whatever is thrown at them ends in success or a one-line PeftkitError, never another exception."""

from __future__ import annotations

import json
import math
import os
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import peftkit
from peftkit.errors import PeftkitError
from peftkit.train.config import load_train_config, valid_keys
from tests.tiny import tiny_model

EXAMPLES = int(os.environ.get("PEFTKIT_FUZZ_EXAMPLES", "60"))  # 500 ran clean when this was written
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["1e-4", "abc", "all-linear", "q_proj,v_proj", "[", "(", "0",
                                                           "-1", "inf", "nan", "lora", "prefix", "full"]))
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=5), scalars, max_size=3))


def _one_line(exc: PeftkitError) -> None:
    assert str(exc) and "\n" not in str(exc), repr(str(exc))


@FUZZ
@given(st.dictionaries(st.sampled_from(valid_keys()), values, max_size=6))
def test_train_config_is_valid_or_one_line_error(options):
    try:
        cfg = load_train_config(None, options)
    except PeftkitError as exc:
        _one_line(exc)
        return
    for name in ("lr", "epochs", "warmup", "max_grad_norm", "weight_decay"):
        value = getattr(cfg, name)
        assert value is None or (isinstance(value, float) and math.isfinite(value)), (name, value)


@cache
def _adapter_files(root: str) -> tuple[dict, Path]:
    model = tiny_model("llama")
    peftkit.inject(model, peftkit.LoraConfig(r=2))
    folder = Path(root) / "adapter"
    peftkit.save_adapter(model, folder)
    return json.loads((folder / "adapter_config.json").read_text()), folder


LORA_KEYS = ["r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "rank_pattern", "alpha_pattern",
             "peft_type", "use_dora", "modules_to_save", "fan_in_fan_out", "lora_bias", "task_type"]


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(LORA_KEYS), values, max_size=4))
def test_adapter_config_loads_or_one_line_error(changes, tmp_path_factory):
    config, folder = _adapter_files(str(tmp_path_factory.getbasetemp()))
    case = tmp_path_factory.mktemp("case")
    for name in ("adapter_model.safetensors", "peftkit.json"):
        (case / name).write_bytes((folder / name).read_bytes())
    (case / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    try:
        peftkit.load_adapter(tiny_model("llama"), case)
    except PeftkitError as exc:
        _one_line(exc)


@cache
def _tokenizer():
    from transformers import AutoTokenizer

    from peftkit.io.models import embedded_folder

    return AutoTokenizer.from_pretrained(embedded_folder())


row_fields = st.sampled_from(["instruction", "input", "output", "messages", "conversations", "text", "role", "x"])
row_values = st.one_of(scalars, st.lists(st.one_of(scalars, st.dictionaries(
    st.sampled_from(["role", "content", "from", "value"]), scalars, max_size=3)), max_size=3))


@FUZZ
@given(rows=st.lists(st.dictionaries(row_fields, row_values, max_size=4), min_size=1, max_size=4))
def test_data_rows_tokenize_or_one_line_error(rows, tmp_path_factory):
    from peftkit.data import load_rows, tokenize

    file = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    try:
        tokenize(load_rows(str(file)), _tokenizer(), max_length=64)
    except PeftkitError as exc:
        _one_line(exc)


@FUZZ
@given(st.sampled_from(["full", "freeze", "lora", "qlora", "adapter", "prefix", "prompt", "dora"]),
       st.dictionaries(st.sampled_from(["r", "lora_alpha", "bits", "layers", "variant", "reduction_factor",
                                        "num_virtual_tokens", "target_modules"]), scalars, max_size=3),
       st.integers(-3, 1 << 30), st.one_of(st.none(), st.floats(allow_nan=True)))
def test_estimate_is_an_estimate_or_one_line_error(method, options, seq_len, gpu_memory):
    from peftkit.memory import estimate_memory

    try:
        est = estimate_memory("smollm2-135m", method, seq_len=seq_len, gpu_memory_gb=gpu_memory, **options)
    except PeftkitError as exc:
        _one_line(exc)
        return
    assert est.total_bytes > 0


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e39"])
def test_cli_weights_must_be_finite(text):
    from peftkit.merging.deltas import parse_weights

    if text == "1e39":
        assert parse_weights(text, 1) == [1e39]  # finite here; the overflow is caught when applied
        return
    with pytest.raises(PeftkitError, match="finite"):
        parse_weights(text, 1)
