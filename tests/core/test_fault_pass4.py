"""The fourth adversarial pass's cases, in-process. First the last wrong success: an adapter whose weights are huge
but finite (LoRA lora_B of 1e20) loaded, and `generate` / `chat` / `eval` ran a model whose logits were exactly 0
(the final norm's mean of squares overflowed to inf, rsqrt(inf) = 0), printed empty text and exited 0. The probe
forward after loading (`peftkit.io.probe`) refuses it, and passes an adapter of every method with trained-like
weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit
from peftkit.core.registry import get_method
from peftkit.errors import PeftkitError
from peftkit.io.probe import check_adapted_output
from tests.cli_errors import cli_error_line
from tests.tiny import WIDE, perturb_adapter, save_tiny_checkpoint, tiny_model, write_rows

# every adapter method (DoRA is LoRA's option), with options that fit a tiny model
METHODS = {"lora": {}, "dora": {"use_dora": "true"}, "ia3": {}, "vera": {}, "oft": {}, "lokr": {}, "loha": {},
           "prefix": {}, "prompt": {}, "adapter": {}}


@pytest.mark.parametrize("method", METHODS)
def test_the_probe_passes_an_adapter_of_every_method(method):
    model = tiny_model("llama", WIDE)
    options = METHODS[method]
    peftkit.inject(model, get_method("lora" if method == "dora" else method).build_config(options))
    perturb_adapter(model, scale=0.5)
    check_adapted_output(model, method)


def test_the_probe_does_not_blame_the_adapter_for_a_degenerate_base():
    model = tiny_model("llama")
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit 0 without any adapter
    peftkit.inject(model, peftkit.LoraConfig(r=2))
    perturb_adapter(model)
    check_adapted_output(model, "x")


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A tiny base with a tokenizer (the embedded model's)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("base") / "base")


@pytest.fixture(scope="module")
def huge(base_folder, tmp_path_factory):
    """(base folder, adapter with lora_B = 1e20, an eval data file)."""
    root = tmp_path_factory.mktemp("huge")
    model = type(tiny_model("llama")).from_pretrained(base_folder)
    peftkit.inject(model, peftkit.LoraConfig(r=2))
    perturb_adapter(model)
    peftkit.save_adapter(model, root / "huge")
    weights = root / "huge" / "adapter_model.safetensors"
    tensors = {k: torch.full_like(v, 1e20) if "lora_B" in k else v for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    return base_folder, root / "huge", write_rows(root / "data.jsonl", 2)


def test_the_probe_refuses_huge_finite_weights(huge):
    base, adapter, _ = huge
    model = type(tiny_model("llama")).from_pretrained(base)
    peftkit.load_adapter(model, adapter)
    with pytest.raises(PeftkitError, match="give every token the same score"):
        check_adapted_output(model, str(adapter))


def test_the_probe_refuses_weights_that_swamp_the_model_without_overflowing():
    model = tiny_model("llama")
    peftkit.inject(model, peftkit.LoraConfig(r=2))
    perturb_adapter(model)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.fill_(1e6)  # logits stay finite and varied: the answer is garbage all the same
    with pytest.raises(PeftkitError, match="makes the residual stream .*x as large as the base model's"):
        check_adapted_output(model, "x")


@pytest.mark.parametrize("command", ["generate", "chat", "eval"])
def test_generate_chat_and_eval_refuse_huge_finite_weights(huge, capsys, command):
    base, adapter, data = huge
    argv = {"generate": ["generate", "hi", "--max-new-tokens", "2"], "chat": ["chat"],
            "eval": ["eval", "--data", str(data), "--no-forgetting"]}[command]
    line = cli_error_line([*argv, "--model", str(base), "--adapter", str(adapter)], capsys)
    assert f"adapter {str(adapter)!r} breaks the model" in line


LATE_SIGNAL = """
import os, signal, sys, time
class Late:  # torn down with __main__'s globals, after Python reset its signal handlers
    def __del__(self, kill=os.kill, pid=os.getpid(), sig=getattr(signal, sys.argv[1]), sleep=time.sleep):
        kill(pid, sig)
        sleep(0.2)
late = Late()
sys.argv = ["peftkit", *sys.argv[2:]]
from peftkit.cli import main
main()
"""


@pytest.mark.parametrize("signal_name,argv,code", [("SIGINT", ["merge", "-a", "missing"], 2),
                                                   ("SIGTERM", ["--version"], 0)])
def test_a_signal_after_the_outcome_keeps_the_exit_code(tmp_path, signal_name, argv, code):
    """One SIGINT sent to `peftkit merge` after its error line, while the interpreter shut down, ended it with -2
    (killed by the signal, 130 in a shell), sometimes with a KeyboardInterrupt traceback, instead of exit code 2;
    a page job killed by SIGTERM just as it finished, its output complete, reported -15 instead of 0."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", LATE_SIGNAL, signal_name, *argv], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == code and len(errors) == (code == 2) and "Traceback" not in done.stderr, \
        (done.returncode, done.stderr)


def _edited_config(base, tmp_path, **fields):
    folder = tmp_path / "edited"
    shutil.copytree(base, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return folder


@pytest.mark.parametrize("field,value", [("hidden_size", -32), ("hidden_size", 32.5), ("hidden_size", "32"),
                                         ("num_hidden_layers", True), ("num_hidden_layers", 10**9),
                                         ("vocab_size", 10**12)])
def test_a_damaged_config_size_is_refused_before_transformers_reads_it(base_folder, tmp_path, capsys, field, value):
    """A negative or fractional size crashed torch (traceback), a string or bool one crashed transformers' type
    check, 10**9 layers hung its config reader (a per-layer list) in estimate and inspect."""
    folder = _edited_config(base_folder, tmp_path, **{field: value})
    for argv in (["estimate", "--model", str(folder)], ["inspect", str(folder)],
                 ["generate", "hi", "--model", str(folder), "--max-new-tokens", "1"]):
        line = cli_error_line(argv, capsys)
        assert f"{field} is {value!r}; it must be a whole number from 1 to" in line, line


def test_a_config_that_does_not_fit_the_weights_is_refused(base_folder, tmp_path, capsys):
    """Without hidden_size transformers takes its default (4096) and its size-mismatch RuntimeError was a traceback."""
    folder = _edited_config(base_folder, tmp_path, hidden_size=None)
    line = cli_error_line(["generate", "hi", "--model", str(folder), "--max-new-tokens", "1"], capsys)
    assert "its weights do not fit the sizes its config.json gives" in line


def test_generation_stops_at_the_context(base_folder, capsys):
    """--max-new-tokens 10**12 generated past the model's 256 positions for ever; now at most what the context
    leaves, and a prompt that fills it is refused."""
    from peftkit.cli._generation import Generator

    generator = Generator(str(base_folder), None, seed=0)
    assert generator.room(10, 10**12) == 246 and generator.room(10, 5) == 5
    with pytest.raises(PeftkitError, match="the prompt is 256 tokens, and the model's context holds 256"):
        generator.room(256, 1)
    line = cli_error_line(["generate", "word " * 300, "--model", str(base_folder), "--max-new-tokens", "1"], capsys)
    assert "and the model's context holds 256; shorten it" in line


@pytest.mark.parametrize("text,expected", [
    (b"\xff\xfe\x00\x01rank: 8", "is not UTF-8 text"),  # a UnicodeDecodeError traceback
    (b"a: " + b"[" * 5000 + b"]" * 5000, "nests deeper than a YAML reader goes"),  # a RecursionError traceback
    (b"rank: 4\nrank: 8\n", "the key 'rank' is given twice"),  # trained with 8, silently
])
def test_damaged_recipes_are_refused(tmp_path, capsys, text, expected):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(text)
    assert expected in cli_error_line(["train", "--config", str(recipe), "--print-config"], capsys)


def test_a_recipe_may_override_what_it_merges_in():
    import yaml

    from peftkit.train.options.recipe_keys import _UniqueKeys

    assert yaml.load("b: &b {rank: 4}\nr:\n  <<: *b\n  rank: 8\n", Loader=_UniqueKeys)["r"] == {"rank": 8}


def test_an_infinite_temperature_is_refused(capsys):
    """--temperature inf (or 1e309) sampled uniformly random tokens and exited 0."""
    assert "--temperature" in cli_error_line(["generate", "hi", "--temperature", "1e309"], capsys)


@pytest.mark.parametrize("template,expected", [("{{ ''.__class__.__mro__ }}", "SecurityError"),
                                               ("{% for i in range(10**9) %}x{% endfor %}", "Range too big"),
                                               ("{% for %}", "TemplateSyntaxError")])
def test_a_base_models_hostile_chat_template_is_refused(base_folder, tmp_path, capsys, template, expected):
    """`generate` used the base tokenizer's chat template unchecked: a sandbox escape attempt, a huge loop or a
    syntax error in it was a jinja traceback (train already checked it)."""
    folder = tmp_path / "base"
    shutil.copytree(base_folder, folder)
    (folder / "chat_template.jinja").write_text(template)
    line = cli_error_line(["generate", "hi", "--model", str(folder), "--max-new-tokens", "1"], capsys)
    assert f"the chat template of model {str(folder)!r}" in line and expected in line, line


def test_an_output_another_command_created_meanwhile_is_not_replaced(tmp_path):
    """Two merges into one new output at once both reported success, the later one silently replacing the other's
    result (neither had --overwrite). Now the later rename finds the folder taken and refuses."""
    from peftkit.io.fs import atomic_dir

    out = tmp_path / "out"
    with pytest.raises(PeftkitError, match="was created by another command while this one ran"), \
            atomic_dir(out, command="merge") as tmp:
        (tmp / "mine.txt").write_text("mine")
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "theirs.txt").read_text() == "theirs"


def test_an_output_finished_by_another_command_after_the_check_is_not_replaced(tmp_path):
    """The same race when the other command finished between this one's output check and its write."""
    from peftkit.io.fs import atomic_dir, write_marker
    from peftkit.io.outputs import check_output

    out = tmp_path / "out"
    check_output(out, overwrite=False)
    out.mkdir()  # the other command (another process), start to finish
    (out / "theirs.txt").write_text("theirs")
    write_marker(out, "merge")
    with pytest.raises(PeftkitError, match="was created by another command"), atomic_dir(out, command="merge") as tmp:
        (tmp / "mine.txt").write_text("mine")
    assert (out / "theirs.txt").read_text() == "theirs" and not (out / "mine.txt").exists()
    check_output(out, overwrite=True)  # asked for: replaced
    with atomic_dir(out, command="merge") as tmp:
        (tmp / "mine.txt").write_text("mine")
    assert (out / "mine.txt").is_file()


def test_a_data_file_that_is_a_pipe_or_a_device_is_named_so(tmp_path, capsys):
    """A FIFO or a link to /dev/zero given as --data was refused as a file that "does not exist"."""
    import os

    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.jsonl"
    zero.symlink_to("/dev/zero")
    for data in (fifo, zero):
        line = cli_error_line(["eval", "--data", str(data), "--model", "missing-folder/x/y"], capsys)
        assert "is not a regular file (a pipe or a device?)" in line, line
