"""The objective registry: built-ins in order, one-line errors, options declared once, and plugins from the
`peftkit.objectives` entry points (loaded once, on the first lookup) whose options reach recipes and flags."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from peftkit.core.options import Option
from peftkit.errors import PeftkitError
from peftkit.train.config import load_train_config, resolve_defaults
from peftkit.train.objectives import base


class Echo(base.Objective):
    """A plugin objective (never trained here: only its declarations are used)."""

    name = "echo"
    options = (Option("echo_scale", float, 3.0, "How loud.", low=0, low_open=True, aliases=("echo_loudness",)),)
    rows_per_example = 3


def test_builtins_options_and_errors():
    assert base.objective_names()[:5] == ["sft", "dpo", "orpo", "simpo", "kto"]
    names = [o.name for o in base.declared_options()]
    assert len(names) == len(set(names)) and {"beta", "simpo_gamma", "precompute_ref", "desirable_weight"} <= set(names)
    assert base.option_aliases()["pref_beta"] == "beta"
    with pytest.raises(PeftkitError, match=r"^objective must be one of sft, dpo, orpo, simpo, kto, grpo; got 'nope'$"):
        base.get_objective("nope")
    with pytest.raises(PeftkitError, match="a named peftkit Objective"):
        base.register_objective(object())


@pytest.fixture
def plugin(monkeypatch):
    """Echo offered by an entry point, the registry made to look again; removed afterwards."""
    point = EntryPoint(name="echo", value="tests.train.test_objective_registry:Echo", group=base.ENTRY_POINT_GROUP)
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [point] if group == point.group else [])
    monkeypatch.setattr(base, "_loaded", False)
    yield
    base._REGISTRY.pop("echo", None)


def test_entry_point_plugin_is_registered_with_its_options(plugin, tmp_path):
    assert "echo" in base.objective_names() and isinstance(base.get_objective("echo"), Echo)
    cfg = resolve_defaults(load_train_config(None, {"objective": "echo", "data": "x.jsonl"}))
    assert cfg.objective_options == {"echo_scale": 3.0} and cfg.to_dict()["echo_scale"] == 3.0
    recipe = tmp_path / "r.yaml"
    recipe.write_text("objective: echo\necho_loudness: 5\ndata: x.jsonl\n")
    assert load_train_config(recipe).objective_options == {"echo_scale": 5.0}
    with pytest.raises(PeftkitError, match="--echo-scale is an option of echo; add --objective echo"):
        load_train_config(None, {"echo_scale": 2.0})
    with pytest.raises(PeftkitError, match="batch_tokens .* must be at least 3 x max_length"):
        resolve_defaults(load_train_config(None, {"objective": "echo", "data": "x.jsonl", "batch_tokens": 100,
                                                  "max_length": 64}))


def test_a_broken_plugin_is_one_line(monkeypatch):
    point = EntryPoint(name="broken", value="no_such_module_here:Thing", group=base.ENTRY_POINT_GROUP)
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [point])
    monkeypatch.setattr(base, "_loaded", False)
    with pytest.raises(PeftkitError, match="the objective plugin 'broken' .* failed to load"):
        base.objective_names()
