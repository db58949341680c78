"""The analytic model stays within 10% of the traced tensor peak; the published sanity figures; bad input."""

import json
from pathlib import Path

import pytest

from peftkit.errors import PeftkitError
from peftkit.memory import estimate_memory
from peftkit.memory.presets import resolve_config
from peftkit.memory.step_trace import trace_memory
from peftkit.memory.training_setup import TrainingSetup

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "memory" / "traces.json"
RECORDS = json.loads(FIXTURE.read_text())


def _parse(key):
    """preset|method|precision|ckpt=0|seq=512[|option=value...] (method options, e.g. target_parameters=...)."""
    preset, method, precision, ckpt, seq, *options = key.split("|")
    return preset, method, precision, ckpt.split("=")[1], int(seq.split("=")[1]), dict(o.split("=", 1) for o in options)


def tensor_bytes(preset, method, precision, ckpt, seq, options):
    est = estimate_memory(preset, method, precision=precision, seq_len=seq, gradient_checkpointing=ckpt == "1",
                          **options)
    return est.total_bytes - est.breakdown["overhead"]


@pytest.mark.parametrize("key", sorted(RECORDS))
def test_analytic_within_10_percent_of_trace(key):
    preset, method, precision, ckpt, seq, options = _parse(key)
    record = RECORDS[key]
    assert "error" not in record, f"the recorded trace failed: {record.get('error')}"
    analytic = tensor_bytes(preset, method, precision, ckpt, seq, options)
    assert abs(analytic / record["peak_bytes"] - 1) <= 0.10, (analytic, record)


@pytest.mark.parametrize("key", ["smollm2-135m|lora|amp|ckpt=0|seq=512", "qwen1.5-7b|full|bf16|ckpt=1|seq=2048"])
def test_fixture_is_current(key):
    """A recorded trace equals a fresh one (re-run scripts/refresh_memory_fixtures.py when this fails)."""
    preset, method, precision, ckpt, seq, _ = _parse(key)
    fresh = trace_memory(resolve_config(preset)[0], TrainingSetup(method, precision, seq_len=seq,
                                                                   gradient_checkpointing=ckpt == "1"))
    assert fresh.peak_bytes == RECORDS[key]["peak_bytes"]


def test_qwen15_7b_full_amp_needs_sharding():
    one = estimate_memory("qwen1.5-7b", "full", precision="amp", seq_len=1024, gpu_memory_gb=80)
    assert not one.fits and one.gpus_needed is None  # plain data parallel never helps
    two = estimate_memory("qwen1.5-7b", "full", precision="amp", seq_len=1024, gradient_checkpointing=True,
                          gpus=2, deepspeed="zero3", gpu_memory_gb=80)  # fmt: skip
    assert two.fits and two.gpus_needed == 2


def test_qwen15_72b_full_needs_about_twenty_80gb_gpus():
    est = estimate_memory("qwen1.5-72b", "full", precision="amp", gradient_checkpointing=True, gpus=16, deepspeed="zero3",
                          gpu_memory_gb=80)  # fmt: skip
    assert 16 <= est.gpus_needed <= 24


def test_lora_7b_with_checkpointing_fits_24gb_at_1024():
    est = estimate_memory("qwen1.5-7b", "lora", precision="bf16", seq_len=1024, gradient_checkpointing=True,
                          gpu_memory_gb=24)  # fmt: skip
    assert est.fits and est.max_seq_len >= 1024 and est.max_batch_size >= 1


def test_breakdown_sums_to_total_and_sharding_lowers_it():
    plain = estimate_memory("llama-2-7b", "full", precision="bf16")
    assert sum(plain.breakdown.values()) == plain.total_bytes
    zero = [estimate_memory("llama-2-7b", "full", precision="bf16", gpus=4, deepspeed=f"zero{z}").total_bytes for z in (1, 2, 3)]
    assert plain.total_bytes > zero[0] > zero[1] > zero[2]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(model="qwen9-1t"), "presets"),
        (dict(batch_size=0), "batch-size"),
        (dict(seq_len=-5), "seq-len"),
        (dict(gpus=0), "gpus"),
        (dict(gpu_memory_gb=0), "gpu-memory"),
        (dict(method="full", r=8), "does not apply"),
        (dict(method="prefix", reduction_factor=4), "does not apply"),
        (dict(method="qlora", bits=3), "bits"),
        (dict(deepspeed="zero2", fsdp=True), "either"),
        (dict(offload=True), "sharding"),
        (dict(method="dora"), "method"),
        (dict(method="prefix", gradient_checkpointing=True), "checkpointing"),
    ],
)
def test_bad_input_is_one_line_error(kwargs, message):
    kwargs = {"model": "llama-2-7b", **kwargs}
    with pytest.raises(PeftkitError, match=message) as err:
        estimate_memory(kwargs.pop("model"), kwargs.pop("method", "full"), **kwargs)
    assert "\n" not in str(err.value)
