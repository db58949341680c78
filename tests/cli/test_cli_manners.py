"""CLI manners: --version, -h, shell completion, help that imports no heavy library, help text on every option,
compress's summary, and `peftkit chat` (history, /reset, /exit) sharing generate's code."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import click
import pytest
import typer.main

import peftkit
import peftkit.cli.compress as compress_cli
from peftkit.cli import app, main
from peftkit.cli._generation import Generator
from peftkit.cli.chat import _fit
from peftkit.data.prompting import PLAIN_TEMPLATE
from peftkit.merging.compress import CompressReport, ModuleRow
from tests.tiny import save_tiny_checkpoint

HEAVY = ("torch", "transformers", "datasets", "accelerate")


def fresh_python(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a new interpreter (nothing imported yet) from the checkout holding these tests."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)


# What the subprocess prints last: the heavy modules it ended up importing.
_CLI_RUN = """
import json, sys
from peftkit.cli import main
try:
    main({args!r})
except SystemExit as exc:
    assert not exc.code, exc.code
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


@pytest.mark.parametrize("args, expected", [
    (["--help"], "Usage: peftkit"),
    (["-h"], "Usage: peftkit"),
    (["--version"], f"peftkit {peftkit.__version__}"),
    (["train", "--help"], "--epochs"),
    (["chat", "-h"], "/exit"),
])
def test_help_and_version_import_no_heavy_library(args, expected):
    out = fresh_python(_CLI_RUN.format(args=args, heavy=HEAVY))
    assert out.returncode == 0, out.stderr
    *shown, imported = out.stdout.rstrip("\n").split("\n")
    assert json.loads(imported) == [], f"peftkit {' '.join(args)} imported {imported}"
    assert expected in "\n".join(shown)


def test_lazy_package_keeps_every_public_name_and_registers_the_methods():
    out = fresh_python(f"""
import sys
import peftkit
assert not [m for m in {HEAVY!r} if m in sys.modules], "import peftkit imported a heavy library"
assert set(peftkit.__all__) <= set(dir(peftkit))
from peftkit import LoraConfig
from peftkit.core.registry import method_names
print(method_names())
for name in peftkit.__all__:
    assert getattr(peftkit, name) is not None, name
from peftkit import *
try:
    peftkit.no_such_name
except AttributeError as exc:
    print(exc)
""")
    assert out.returncode == 0, out.stderr
    registered, missing = out.stdout.splitlines()
    assert registered == str(["adapter", "freeze", "full", "ia3", "loha", "lokr", "lora", "oft", "prefix", "prompt",
                              "qlora", "vera"])
    assert missing == "module 'peftkit' has no attribute 'no_such_name'"


@pytest.mark.parametrize("code", ["import peftkit\npeftkit.load_adapter", "import peftkit.io.adapters",
                                  "from peftkit.train.config import load_train_config"])
def test_any_use_of_the_library_registers_the_methods(code):
    """The registry is looked up by name and peft_type (`peftkit.load_adapter`, the trainer): the first public name
    used, and any import of a library module (through `peftkit.core`), registers every method first."""
    out = fresh_python(f"{code}\nfrom peftkit.core.registry import method_names\nprint(len(method_names()))")
    assert out.returncode == 0, out.stderr
    from peftkit.core.registry import method_names

    assert out.stdout.strip() == str(len(method_names()))  # as many as in this process


def test_version_and_short_help_in_process(capsys):
    main(["--version"])
    assert capsys.readouterr().out == f"peftkit {peftkit.__version__}\n"
    main(["merge", "-h"])
    short = capsys.readouterr().out
    main(["merge", "--help"])
    assert short == capsys.readouterr().out and "--check-logits" in short


def test_shell_completion_is_on():
    # Typer detects the user's shell from the parent processes; a test run started without a shell above it (a
    # background job, a CI runner) has none, so the shell is named instead of detected (typer's own switch for this).
    named = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    out = subprocess.run([sys.executable, "-m", "peftkit.cli", "--show-completion", "bash"], capture_output=True,
                         text=True, timeout=300, env=named)
    assert out.returncode == 0, out.stderr
    assert "_PEFTKIT_COMPLETE=complete_bash" in out.stdout and "complete " in out.stdout
    env = {**os.environ, "_PEFTKIT_COMPLETE": "complete_bash", "COMP_WORDS": "peftkit train --gradient-ch",
           "COMP_CWORD": "2"}
    out = subprocess.run([sys.executable, "-m", "peftkit.cli"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["--gradient-checkpointing"]


def test_every_option_and_argument_has_help():
    root = typer.main.get_command(app)
    commands = {"peftkit": root, **{f"peftkit {name}": cmd for name, cmd in root.commands.items()}}
    assert {"peftkit chat", "peftkit generate", "peftkit train", "peftkit compress"} <= set(commands)
    missing = [f"{where} {param.opts[0] if param.opts else param.name}" for where, cmd in commands.items()
               for param in cmd.params if isinstance(param, (click.Option, click.Argument))
               and not (getattr(param, "help", None) or "").strip()]
    assert not missing, f"options without help text: {', '.join(missing)}"


# compress: a summary and the worst modules by default, every module with --verbose.

def _report(n: int) -> CompressReport:
    rows = [ModuleRow(f"mod{i:02d}", (64, 32), 2 + i % 7, i / 100, 1 - i / 100) for i in range(n)]
    rows[3].note = "capped at 21 by the size cap"
    return CompressReport(rows=rows, total_rel_error=1.2345, adapter_bytes=2_500_000, source_bytes=50_000_000,
                          other=[{"tensor": f"norm{i}.weight", "rel_change": 1e-3 * i, "kept": False} for i in range(12)])


def _compress_output(monkeypatch, capsys, tmp_path, report: CompressReport, *extra: str) -> str:
    monkeypatch.setattr(compress_cli, "compress", lambda *a, **k: report)
    capsys.readouterr()
    main(["compress", "--finetuned", "ft", "-o", str(tmp_path / "a"), "--rank", "2", *extra])
    return capsys.readouterr().out


def test_compress_prints_summary_and_the_10_worst_modules(monkeypatch, capsys, tmp_path):
    out = _compress_output(monkeypatch, capsys, tmp_path, _report(30))
    shown = set(re.findall(r"\bmod\d\d\b", out))
    assert shown == {f"mod{i}" for i in range(20, 30)}, sorted(shown)  # the largest errors only
    assert "rel. error" in out and "the 10 modules with the largest error (all 30: --verbose)" in out
    assert "30 modules compressed, rank 2-8 (1 capped: see the note column with --verbose)" in out
    assert "1.2345" in out and "2.50 MB" in out and "50.00 MB" in out and "DROPPED" in out
    assert len(re.findall(r"norm\d+\.weight", out)) == 10 and "norm11.weight" in out and "norm0.weight" not in out


def test_compress_verbose_prints_every_module(monkeypatch, capsys, tmp_path):
    out = _compress_output(monkeypatch, capsys, tmp_path, _report(30), "--verbose")
    assert set(re.findall(r"\bmod\d\d\b", out)) == {f"mod{i:02d}" for i in range(30)}
    assert "capped at 21" in out and "--verbose)" not in out and "30 modules compressed" in out
    assert len(re.findall(r"norm\d+\.weight", out)) == 12


def test_compress_short_report_is_whole_without_verbose(monkeypatch, capsys, tmp_path):
    report = _report(4)
    report.rows[0].rel_error = math.nan  # sorts first, prints as nan, does not break the summary
    out = _compress_output(monkeypatch, capsys, tmp_path, report)
    assert set(re.findall(r"\bmod\d\d\b", out)) == {"mod00", "mod01", "mod02", "mod03"}
    assert "largest error (all" not in out and "4 modules compressed, rank 2-5 (1 capped: see the note column)" in out


# chat and generate

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("chat") / "tiny")


def _chat(monkeypatch, capsys, folder, lines: str, *extra: str) -> tuple[list[list[dict]], list[str], str]:
    """Run `peftkit chat` on the tiny model with `lines` as stdin; (the messages of every answer, the rendered
    prompts of every answer, stdout)."""
    asked: list[list[dict]] = []
    prompts: list[str] = []
    answer = Generator.answer

    def spy(self, messages, max_new_tokens, temperature):
        asked.append([dict(m) for m in messages])
        prompts.append(self.prompt_text(messages))
        return answer(self, messages, max_new_tokens, temperature)

    monkeypatch.setattr(Generator, "answer", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    capsys.readouterr()
    main(["chat", "--model", str(folder), "--max-new-tokens", "3", *extra])
    return asked, prompts, capsys.readouterr().out


def test_chat_keeps_history_and_exits(monkeypatch, capsys, tiny_folder):
    asked, prompts, out = _chat(monkeypatch, capsys, tiny_folder,
                                "first question\nsecond question\n/exit\nnever asked\n", "--system", "Be brief.")
    assert len(asked) == 2 and "never asked" not in out
    first, second = asked
    assert first == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first question"}]
    assert second[:2] == first and second[2]["role"] == "assistant" and second[3]["content"] == "second question"
    assert "<|im_start|>" in prompts[1]  # the tokenizer's chat template
    assert "Be brief." in prompts[1] and prompts[1].index("first question") < prompts[1].index("second question")
    assert prompts[1].startswith(prompts[0])  # the second prompt holds the first turn and its answer


def test_chat_reset_clears_history_and_eof_ends(monkeypatch, capsys, tiny_folder):
    asked, prompts, out = _chat(monkeypatch, capsys, tiny_folder, "alpha question\n/reset\n\nbeta question\n")
    assert [m["content"] for m in asked[1]] == ["beta question"]
    assert "alpha" not in prompts[1] and "(conversation cleared)" in out


def test_generate_uses_the_shared_code(monkeypatch, capsys, tiny_folder):
    seen = []
    answer = Generator.answer
    monkeypatch.setattr(Generator, "answer", lambda self, m, n, t: seen.append(m) or answer(self, m, n, t))
    main(["generate", "hello", "--model", str(tiny_folder), "--max-new-tokens", "2", "--system", "S"])
    assert seen == [[{"role": "system", "content": "S"}, {"role": "user", "content": "hello"}]]


def test_plain_template_history_is_rendered_as_in_training():
    generator = Generator.__new__(Generator)  # no model: prompt_text needs only the tokenizer and the format
    generator.tokenizer = SimpleNamespace(eos_token="</s>")
    generator.prompt_format = {"plain_template": PLAIN_TEMPLATE}
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    assert generator.prompt_text(messages) == (PLAIN_TEMPLATE.format(prompt="sys\n\nq1") + "a1</s>"
                                               + PLAIN_TEMPLATE.format(prompt="q2"))
    assert generator.prompt_text(messages[:2]) == PLAIN_TEMPLATE.format(prompt="sys\n\nq1")  # what generate sends


def test_chat_drops_oldest_exchanges_to_fit_the_context():
    import torch

    generator = SimpleNamespace(context=100, encode=lambda msgs: {"input_ids": torch.zeros(1, 30 * len(msgs))})
    turns = [{"role": r, "content": str(i)} for i, r in enumerate(["user", "assistant"] * 2 + ["user"])]
    assert _fit(generator, [], turns, max_new_tokens=10) == 1  # 5 turns: 160 tokens > 100; 3 turns: 100
    assert [t["content"] for t in turns] == ["2", "3", "4"]
    assert _fit(generator, [], turns[-1:], max_new_tokens=500) == 0  # the newest message always stays
