"""`peftkit train`'s flags are generated from the options' declarations: every declared option has its flags, help
and short forms; options declared elsewhere (EXTRA_OPTIONS, e.g. per objective) join the command and the recipes."""

from __future__ import annotations

import click
import typer.main
import typer.testing

from peftkit.cli import app
from peftkit.cli._declared import given, signature
from peftkit.core.options import Option
from peftkit.train import config
from peftkit.train.config import load_train_config, train_options


def _train_command() -> click.Command:
    return typer.main.get_command(app).commands["train"]


def test_every_declared_option_is_a_flag_with_its_help():
    params = {p.name: p for p in _train_command().params}
    for name, option in train_options().items():
        if not option.cli:
            assert name not in params, name
            continue
        flags = [*params[name].opts, *params[name].secondary_opts]
        assert set(flags) == {f for spelled in option.cli_flags for f in spelled.split("/")}, name
        assert params[name].help == option.help, name
    shorts = {p.name: [o for o in p.opts if not o.startswith("--")] for p in params.values()}
    assert (shorts["config"], shorts["model"], shorts["rank"], shorts["data"], shorts["output"]) == \
        (["-c"], ["-m"], ["-r"], ["-d"], ["-o"])
    assert params["data"].multiple and params["columns"].multiple and params["report_to"].multiple
    assert params["sets"].multiple and params["sets"].opts == ["--set"]
    assert params["packing"].secondary_opts == ["--no-packing"] and params["overwrite"].secondary_opts == []


def test_repeated_flags_are_joined_and_switches_left_off_are_unset():
    options = list(train_options().values())
    values = {"data": ["a.jsonl", "b.jsonl"], "columns": ["instruction=q,output=a"], "report_to": None,
              "overwrite": False, "packing": False, "rank": 8}
    got = given(options, values)
    assert (got["data"], got["columns"], got["report_to"], got["overwrite"], got["packing"], got["rank"]) == \
        ("a.jsonl,b.jsonl", {"instruction": "q", "output": "a"}, None, None, False, 8)


def test_extra_options_join_the_command_and_route_into_their_field(monkeypatch, tmp_path):
    extra = Option("prompt_column", str, help="An option declared elsewhere.", aliases=("their_name",))
    monkeypatch.setitem(config.EXTRA_OPTIONS, "columns", lambda: [extra])
    seen = {}

    def command(**values) -> None:
        seen.update(given([extra], values))

    command.__signature__ = signature([*train_options().values(), extra])
    one = typer.Typer()
    one.command()(command)
    typer.testing.CliRunner().invoke(one, ["--prompt-column", "q"], catch_exceptions=False)
    assert seen == {"prompt_column": "q"}
    (tmp_path / "r.yaml").write_text("their_name: question\n")
    assert load_train_config(tmp_path / "r.yaml").columns == {"prompt_column": "question"}
    assert load_train_config(None, {"prompt_column": "q"}).columns == {"prompt_column": "q"}
