"""`peftkit estimate` end to end: table, --json, --list, --trace, and one-line errors with exit code 2."""

import json

import pytest

from peftkit.cli import main


def run(capsys, *args):
    code = 0
    try:
        main(["estimate", *args])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_has_breakdown_and_answers(capsys):
    code, out, _ = run(capsys, "--model", "Qwen1.5-7B", "--method", "full", "--precision", "amp",
                       "--gpu-memory", "80", "--json")  # fmt: skip
    data = json.loads(out)
    assert code == 0 and data["fits"] is False and data["total_params"] == 7_721_324_544
    assert set(data["breakdown"]) >= {"frozen_weights", "optimizer_states", "step_temporaries", "overhead"}
    assert sum(data["breakdown"].values()) == data["total_bytes"] and "1e9" in data["units"]


def test_table_says_gb_unit_and_list(capsys):
    code, out, _ = run(capsys, "--model", "llama-2-7b", "--method", "lora", "--rank", "16", "--seq-len", "1024")
    assert code == 0 and "10^9 bytes" in out and "total per GPU" in out
    code, out, _ = run(capsys, "--list")
    assert code == 0 and "qwen2.5-72b" in out


def test_trace_reports_corrections(capsys):
    code, out, _ = run(capsys, "--model", "smollm2-135m", "--method", "full", "--max-length", "256",
                       "--trace", "--json")  # fmt: skip
    trace = json.loads(out)["trace"]
    assert code == 0 and trace["total_bytes"] > trace["peak_bytes"] > 0
    assert any("CUDA context" in c for c in trace["corrections"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "gpt-9"], "presets"),
        (["--model", "llama-2-7b", "--batch-size", "0"], "batch-size"),
        (["--model", "llama-2-7b", "--method", "full", "--rank", "8"], "does not apply"),
        (["--model", "llama-2-7b", "--method", "qlora", "--trace"], "trace"),
    ],
)
def test_errors_exit_2_with_one_line(capsys, args, message):
    code, _, err = run(capsys, *args)
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_sharding_is_spelled_as_in_train(capsys, tmp_path):
    """--fsdp and --deepspeed zeroN|CONFIG.json as in `peftkit train`; the old --zero N names its replacement."""
    common = ("--model", "qwen1.5-7b", "--method", "full", "--gpus", "2", "--gpu-memory", "80", "--json")
    totals = {}
    for flags in (("--deepspeed", "zero2"), ("--deepspeed", "zero3"), ("--fsdp",)):
        code, out, err = run(capsys, *common, *flags)
        assert code == 0, err
        totals[flags[-1]] = json.loads(out)["total_bytes"]
    assert totals["zero2"] > totals["zero3"]
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}))
    code, out, _ = run(capsys, *common, "--deepspeed", str(config))
    assert code == 0 and json.loads(out)["total_bytes"] == totals["zero3"]
    code, _, err = run(capsys, *common, "--zero", "3")
    assert code == 2 and "--deepspeed zero3" in err and "Traceback" not in err
    code, _, err = run(capsys, *common, "--deepspeed", "zero9")
    assert code == 2 and "zero1, zero2, zero3" in err
