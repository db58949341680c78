"""The fake-tensor trace equals a real CPU step measured by the same live-storage tracker (<= 3%)."""


import pytest
from transformers import LlamaConfig, Qwen2Config

from peftkit.memory.presets import resolve_config
from peftkit.memory.step_trace import measure_real_step, trace_memory
from peftkit.memory.training_setup import TrainingSetup

TINY = {
    "llama": LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=1000, tie_word_embeddings=True),
    "qwen2": Qwen2Config(hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000),
}  # fmt: skip
SETUPS = [
    dict(method="full", precision="fp32"),
    dict(method="full", precision="bf16", batch_size=2),
    dict(method="full", precision="amp", gradient_checkpointing=True),
    dict(method="full", precision="fp32", optimizer="sgd"),
    dict(method="freeze", precision="amp", method_options={"layers": 1}),
    dict(method="lora", precision="amp", method_options={"r": 4}),
    dict(method="lora", precision="bf16", gradient_checkpointing=True),
    dict(method="adapter", precision="amp"),
    dict(method="prefix", precision="bf16"),
    dict(method="prompt", precision="amp", gradient_checkpointing=True),
]


@pytest.mark.parametrize("arch", sorted(TINY))
@pytest.mark.parametrize("kw", SETUPS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_trace_equals_real_step(arch, kw):
    setup = TrainingSetup(seq_len=96, **{"batch_size": 1, **kw})
    fake, real = trace_memory(TINY[arch], setup), measure_real_step(TINY[arch], setup)
    assert fake.trainable_params == real.trainable_params
    assert fake.state_bytes == real.state_bytes
    assert abs(fake.peak_bytes - real.peak_bytes) <= 0.03 * real.peak_bytes, (fake.phases, real.phases)


def test_full_amp_step_peak_is_twenty_bytes_per_parameter():
    """amp full fine-tune at a short length peaks in the AdamW foreach step: fp32 weights, grads, 2 states and
    the sqrt(exp_avg_sq) copy = 5 x 4 bytes per parameter (buffers and the input ids aside)."""
    r = trace_memory(TINY["qwen2"], TrainingSetup("full", "amp", seq_len=8))
    assert r.peak_phase == "optimizer step"
    assert r.peak_bytes - r.state_bytes == 8 * r.total_params  # grads + foreach copy on top of the state
    assert 12 * r.total_params <= r.state_bytes < 12 * r.total_params + 10_000


def test_72b_traces_on_the_meta_device():
    """A 72B model traces without allocating its weights (how long it takes is the benchmark's business)."""
    config, _ = resolve_config("qwen2.5-72b")
    r = trace_memory(config, TrainingSetup("lora", "bf16", seq_len=2048, gradient_checkpointing=True))
    assert r.total_params == 72_706_203_648 + r.trainable_params
    assert r.peak_bytes > 2 * 72_706_203_648  # at least the bf16 base weights
