"""Checkpoints and adapters are read without unpickling anything: a planted pickle never runs, and a damaged file
is one PeftkitError line naming it (peftkit/train/checkpoints/ describes the format).

The malicious payload is a pickle whose loading creates a marker file (`pathlib.Path.touch`); a test first checks
that unpickling it really does, then plants it in place of (or beside) every file a resume or an adapter load reads.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peftkit
from peftkit import LoraConfig, PeftkitError
from peftkit.cli import main
from peftkit.io.fs import MARKER_NAME
from peftkit.train.checkpoints import Position, load_checkpoint, save_checkpoint
from peftkit.train.checkpoints.rundir import RunDir
from peftkit.train.checkpoints.state import load_state_dict, save_state_dict, unflatten_state
from tests.tiny import perturb_adapter, save_tiny_checkpoint, tiny_model, write_rows

ACCELERATOR = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)  # one process
NEW_FORMAT = ["trainable.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
              "rng.safetensors", "rng.json", "trainer_state.json"]
PICKLE_NAMES = ["optimizer.pt", "scheduler.pt", "rng.pt", "scaler.pt", "random_states_0.pkl", "optimizer.bin",
                "pytorch_model.bin", "training_args.bin", "adapter_model.bin"]


class Plant:
    """Unpickling this runs `Path.touch(marker)`: the stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def payload(kind: str, marker: Path) -> bytes:
    if kind == "pickle":
        return pickle.dumps(Plant(marker), protocol=2)
    buffer = io.BytesIO()
    torch.save({"state": Plant(marker), "weight": torch.zeros(2)}, buffer)  # what a crafted optimizer.pt looks like
    return buffer.getvalue()


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fail loudly if anything is unpickled (on top of the marker file, which only a successful attack creates)."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("something was unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)


# A tiny trainable net (dropout, a frozen layer, two AdamW parameter groups with their own options) ---------------

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.drop, self.b = nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 2)
        self.frozen = nn.Linear(2, 2).requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.b(self.drop(self.a(x))))


def build(seed: int):
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():  # the frozen base is the same in every build (a checkpoint holds only trainable weights)
        for p in net.frozen.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(99)))
    opt = torch.optim.AdamW([{"params": net.a.parameters()},
                             {"params": net.b.parameters(), "lr": 3e-2, "weight_decay": 0.0, "betas": (0.8, 0.95)}],
                            lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 3))
    return net, opt, sched


def step(net, opt, sched) -> dict:
    """One training step drawing from every RNG; what it produced."""
    net.train()
    x = torch.randn(5, 4) + random.random() + float(np.random.rand())
    net(x).pow(2).mean().backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return {"params": [p.detach().clone() for p in net.parameters()], "lr": sched.get_last_lr(),
            "draws": (random.random(), float(np.random.rand()), torch.rand(3))}


def same(a, b, where="") -> None:
    """Exactly equal, types included (tuples stay tuples, int keys stay ints, tensors bit-equal)."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{where}.{i}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.fixture
def saved(tmp_path):
    """A run folder with checkpoints after steps 1 and 2 of the tiny net; (newest checkpoint, marker path)."""
    net, opt, sched = build(0)
    for n in (1, 2):
        step(net, opt, sched)
        folder = save_checkpoint(RunDir(tmp_path / "run"), net, opt, sched, Position(step=n, micro=n, tokens=10 * n), ACCELERATOR)
    return folder, tmp_path / "MARKER"


def resume_fails(folder: Path, *, fresh_seed: int = 1) -> str:
    """load_checkpoint into a fresh net raises a one-line PeftkitError; the message (the net is left unchanged)."""
    net, opt, sched = build(fresh_seed)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(PeftkitError) as exc:
        load_checkpoint(folder, net, opt, sched, 0)
    message = str(exc.value)
    assert "\n" not in message
    same(net.state_dict(), before)
    return message


# (a) round trip ---------------------------------------------------------------------------------------------------

def test_round_trip_restores_optimizer_scheduler_and_rng_exactly(tmp_path):
    net, opt, sched = build(0)
    for _ in range(3):
        step(net, opt, sched)
    folder = save_checkpoint(RunDir(tmp_path), net, opt, sched, Position(step=3, epoch=1, micro=2, tokens=77), ACCELERATOR)
    opt_state, sched_state = copy.deepcopy(opt.state_dict()), sched.state_dict()
    assert isinstance(opt_state["state"][0]["step"], torch.Tensor)  # AdamW keeps its step count as a tensor
    want = step(net, opt, sched)

    other, other_opt, other_sched = build(1)
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    assert load_checkpoint(folder, other, other_opt, other_sched, 0) == Position(step=3, epoch=1, micro=2, tokens=77)
    same(other_opt.state_dict(), opt_state)
    same(other_sched.state_dict(), sched_state)
    same(step(other, other_opt, other_sched), want)  # same update, same lr, same dropout and random draws


def test_checkpoint_holds_only_safetensors_and_json(saved):
    folder, _ = saved
    assert sorted(p.name for p in folder.iterdir()) == sorted([*NEW_FORMAT, MARKER_NAME])  # + peftkit's marker
    assert {p.name for p in RunDir.holding(folder).checkpoints()} == {"step-000001", "step-000002"}
    assert set(load_file(str(folder / "optimizer.safetensors"))) == {
        f"state.{i}.{name}" for i in range(4) for name in ("step", "exp_avg", "exp_avg_sq")}
    assert set(load_file(str(folder / "rng.safetensors"))) == {"0.torch", "0.numpy.key"}
    for name in NEW_FORMAT:
        if name.endswith(".json"):
            json.loads((folder / name).read_text())


def test_state_files_round_trip_what_json_has_no_type_for(tmp_path):
    state = {"t": (1, 2.5, None, "x"), 3: [torch.arange(3), {"__odd": torch.zeros((), dtype=torch.bfloat16)}],
             "nested": {"ok": True, "u": torch.tensor([1, 2], dtype=torch.uint32)}}
    save_state_dict(tmp_path, "s", state)
    same(load_state_dict(tmp_path, "s", "a test state"), state)
    with pytest.raises(PeftkitError, match="cannot hold"):
        save_state_dict(tmp_path, "no_tensors", {"t": torch.ones(1)}, with_tensors=False)


@pytest.mark.parametrize("skeleton", [{"__tensor__": 5}, {"__tensor__": "absent"}, {"__tuple__": 1},
                                      {"__items__": [[{}, 1]]}, {"__reduce__": ["os", "system"]}])
def test_a_skeleton_that_does_not_fit_is_refused(skeleton):
    with pytest.raises(PeftkitError, match="x.json"):
        unflatten_state(skeleton, {}, Path("x.json"))


# (b) malicious pickles --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_the_payload_runs_code_when_unpickled(tmp_path, kind):
    marker = tmp_path / "MARKER"
    (tmp_path / "evil").write_bytes(payload(kind, marker))
    if kind == "pickle":
        pickle.loads((tmp_path / "evil").read_bytes())
    else:
        torch.load(tmp_path / "evil", weights_only=False)
    assert marker.exists()  # so the tests below would see it if anything unpickled their files


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
@pytest.mark.parametrize("name", NEW_FORMAT)
def test_a_pickle_in_place_of_a_checkpoint_file_is_refused(saved, name, kind, no_unpickling):
    folder, marker = saved
    (folder / name).write_bytes(payload(kind, marker))
    message = resume_fails(folder)
    assert name in message and "delete" in message and "step-000001" in message
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_a_checkpoint_of_the_old_pickle_format_is_refused_unopened(saved, kind, no_unpickling):
    folder, marker = saved
    for name in ("optimizer.safetensors", "optimizer.json", "scheduler.json", "rng.safetensors", "rng.json"):
        (folder / name).unlink()
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        (folder / name).write_bytes(payload(kind, marker))
    message = resume_fails(folder)
    assert "older peftkit" in message and "optimizer.pt" in message and "--overwrite" in message
    assert not marker.exists()


def test_pickles_beside_a_checkpoint_are_never_opened(saved, no_unpickling):
    folder, marker = saved
    for name in PICKLE_NAMES:
        (folder / name).write_bytes(payload("torch.save", marker))
    net, opt, sched = build(1)
    assert load_checkpoint(folder, net, opt, sched, 0).step == 2
    assert not marker.exists()


def _adapter_folder(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    model = tiny_model("llama")
    peftkit.inject(model, LoraConfig(r=2))
    perturb_adapter(model)
    folder = peftkit.save_adapter(model, tmp_path / "ad")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    (folder / "adapter_model.safetensors").unlink()
    return folder, tensors


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_a_pickle_as_adapter_model_bin_is_refused(tmp_path, kind):
    folder, _ = _adapter_folder(tmp_path)
    marker = tmp_path / "MARKER"
    (folder / "adapter_model.bin").write_bytes(payload(kind, marker))
    with pytest.raises(PeftkitError, match="adapter_model.bin cannot be read as tensors only") as exc:
        peftkit.load_adapter(tiny_model("llama"), folder)
    assert "\n" not in str(exc.value)
    assert not marker.exists()


def test_a_plain_adapter_model_bin_still_loads(tmp_path):
    folder, tensors = _adapter_folder(tmp_path)
    torch.save(tensors, folder / "adapter_model.bin")
    model = peftkit.load_adapter(tiny_model("llama"), folder)
    again = load_file(str(peftkit.save_adapter(model, tmp_path / "again") / "adapter_model.safetensors"))
    same(again, tensors)


# (c) damaged files ------------------------------------------------------------------------------------------------

def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _rewrite_tensor(file: Path, key: str, value: torch.Tensor | None, new_key: str | None = None) -> None:
    tensors = load_file(str(file))
    del tensors[key]
    if value is not None:
        tensors[new_key or key] = value
    save_file(tensors, str(file))


DAMAGES = {
    "truncated trainable": ("trainable.safetensors", _truncate, "not a valid safetensors file"),
    "truncated optimizer": ("optimizer.safetensors", _truncate, "not a valid safetensors file"),
    "truncated rng": ("rng.safetensors", _truncate, "not a valid safetensors file"),
    "invalid optimizer.json": ("optimizer.json", lambda f: f.write_text('{"format": 1, "state": '), "not valid JSON"),
    "invalid scheduler.json": ("scheduler.json", lambda f: f.write_text("{'last_epoch': 2}"), "not valid JSON"),
    "invalid rng.json": ("rng.json", lambda f: f.write_bytes(b"\xff\xfe"), "not valid JSON"),
    "invalid trainer_state": ("trainer_state.json", lambda f: f.write_text(""), "not valid JSON"),
    "missing optimizer tensors": ("optimizer.safetensors", Path.unlink, "is missing"),
    "missing scheduler": ("scheduler.json", Path.unlink, "is missing"),
    "moment of the wrong shape": ("optimizer.safetensors",
                                  lambda f: _rewrite_tensor(f, "state.1.exp_avg", torch.zeros(3)), "has shape (3,)"),
    "renamed tensor": ("optimizer.safetensors",
                       lambda f: _rewrite_tensor(f, "state.0.step", torch.zeros(()), "state.0.steps"), "does not hold"),
    "parameter of the wrong shape": ("trainable.safetensors",
                                     lambda f: _rewrite_tensor(f, "b.weight", torch.zeros(3, 8)), "model needs (2, 8)"),
    "scheduler of another kind": ("scheduler.json", lambda f: f.write_text('{"format": 1, "state": {"gamma": 0.5}}'),
                                  "scheduler's state has"),
    "position not integers": ("trainer_state.json", lambda f: f.write_text('{"step": "2"}'), "non-negative integers"),
    "rng state not a list": ("rng.json", lambda f: f.write_text('{"format": 1, "state": {"python": 1}}'), "rng"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_checkpoint_file_is_one_error_line(saved, damage):
    folder, _ = saved
    name, spoil, expected = DAMAGES[damage]
    spoil(folder / name)
    message = resume_fails(folder)
    assert str(folder / name) in message and expected in message
    assert ("same --model" in message) if name == "trainable.safetensors" and "wrong shape" in damage \
        else (f"delete {folder} to resume from the earlier step-000001" in message)


# --resume through the CLI -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A 3-step CLI run with checkpoints after steps 1 and 2; (the argv that made it, its run folder)."""
    root = tmp_path_factory.mktemp("ckpt_cli")
    model, data = save_tiny_checkpoint(root / "tiny"), write_rows(root / "d.jsonl", 6)
    argv = ["train", "--quiet", "--model", str(model), "--data", str(data), "--output", str(root / "run"),
            "--max-steps", "3", "--save-steps", "1", "--batch-size", "2", "--max-length", "64", "--precision", "fp32"]
    main(argv)
    return argv, root / "run"


def _resume(argv: list[str], tmp_path: Path, capsys) -> tuple[list[str], str]:
    """Resume a copy of `run` through the CLI, expecting exit code 2; (its argv, the one error line)."""
    copy_dir = tmp_path / "run"
    argv = [*argv[: argv.index("--output") + 1], str(copy_dir), *argv[argv.index("--output") + 2:], "--resume"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    return argv, errors[0]


def test_resume_from_a_damaged_checkpoint_is_one_line_that_says_what_to_do(cli_run, tmp_path, capsys):
    argv, run = cli_run
    shutil.copytree(run, tmp_path / "run")
    newest = RunDir(tmp_path / "run").checkpoints()[-1]
    _truncate(newest / "optimizer.safetensors")
    argv, line = _resume(argv, tmp_path, capsys)
    assert "optimizer.safetensors is not a valid safetensors file" in line
    assert f"delete {newest} to resume from the earlier step-000001" in line
    shutil.rmtree(newest)  # follow the advice
    main(argv)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_from_an_old_pickle_checkpoint_is_refused_unopened(cli_run, tmp_path, capsys):
    argv, run = cli_run
    shutil.copytree(run, tmp_path / "run")
    marker = tmp_path / "MARKER"
    for folder in RunDir(tmp_path / "run").checkpoints():
        for name in ("optimizer.safetensors", "optimizer.json", "scheduler.json", "rng.safetensors", "rng.json"):
            (folder / name).unlink()
        for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
            (folder / name).write_bytes(payload("torch.save", marker))
    _, line = _resume(argv, tmp_path, capsys)
    assert "written by an older peftkit" in line and "--overwrite instead of --resume" in line
    assert not marker.exists()
