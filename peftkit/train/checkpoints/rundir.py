"""The run folder: `RunDir` is the only code that knows its layout, which checkpoint a run resumes from, and how a
fresh run folder replaces an old one without losing it.

    RUN/
      .peftkit-output.json     peftkit's marker (io.fs.MARKER_NAME): --overwrite replaces only folders carrying it
      run_config.yaml          the resolved config (what --resume compares its options with)
      metrics.jsonl            one JSON record per step / evaluation (report.Metrics)
      loss_curve.png           the loss per step (report.plot_loss)
      summary.json             steps, tokens, time, evaluation before and after, where the result is
      adapter/  or  model/     the result: the adapter in PEFT's format, or a whole model folder (full / freeze)
      tracking/                the trackers' files (--report-to)
      checkpoints/step-N/      N zero-padded to 6 digits; complete once it holds trainer_state.json (the position,
                               written last, inside a temporary folder renamed into place: peftkit.train.checkpoints)

"The checkpoint this run continues from" is spelled `resume_from` everywhere (None for a fresh run); the user's
option is the config's `resume` flag. `RunDir.locate(cfg)` turns the config into (RunDir, resume_from) or a one-line
PeftkitError, and writes nothing; `RunDir.fresh()` creates the folder once every input was validated.

Only real folders named exactly `step-<6+ digits>` holding their position file count as checkpoints: a file, a
symbolic link, another name or a half-written folder is skipped (and named in a warning), never deleted; pruning
deletes only checkpoints that also carry peftkit's marker.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.io.fs import MARKER_NAME, remove_stale_temporaries, write_marker, written_by_peftkit
from peftkit.io.outputs import check_replaceable, check_target
from peftkit.train.config import TrainConfig, read_recipe

log = logging.getLogger(__name__)
STEP_NAME = re.compile(r"step-(\d{6,})")  # a checkpoint folder's name: step-000012 (more digits past 999999)

# What a resumed run may change: where and how often it writes, how long it runs, what it reports to, and how fast it
# computes the same thing (attention kernel, compiling, shared prefixes); not the model, data, batches or hyper-parameters.
RESUME_MAY_CHANGE = {"resume", "overwrite", "output", "max_steps", "epochs", "save_steps", "eval_steps", "eval_before",
                     "keep_checkpoints", "dry_run", "report_to", "attention", "compile", "share_prefix"}


class _Entry:
    """A path inside the run folder as a read-only attribute: `RunDir("r").metrics` is Path("r/metrics.jsonl")."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, run: RunDir | None, owner: type | None = None) -> Path:
        if run is None:
            raise AttributeError(f"{self.name!r} is a path inside a run folder: ask a RunDir(...) for it")
        return run.path / self.name


@dataclass(frozen=True)
class RunDir:
    """One run folder: every path in it, its checkpoints, and the rules for creating and resuming it.

    `RunDir("runs/x")` names a folder (nothing is checked or created); `os.fspath` and `str` give its path.
    """

    path: Path

    TRACKING = "tracking"  # also accelerate's project_dir before the trackers start (precision.make_accelerator)
    POSITION = "trainer_state.json"  # inside a checkpoint, written last: its presence marks the checkpoint complete

    config = _Entry("run_config.yaml")         # the resolved config (what --resume compares its options with)
    metrics = _Entry("metrics.jsonl")          # one JSON record per step / evaluation (report.Metrics)
    curve = _Entry("loss_curve.png")           # the loss per step (report.plot_loss)
    summary = _Entry("summary.json")           # steps, tokens, time, evaluation before and after, the result's path
    adapter = _Entry("adapter")                # the result of an adapter method, in PEFT's format
    model = _Entry("model")                    # the result of full / freeze: a whole model folder
    tracking = _Entry(TRACKING)                # the trackers' files (--report-to)
    vllm_adapters = _Entry("vllm-adapters")    # GRPO --use-vllm: each rollout batch's adapter, for the server
    checkpoints_folder = _Entry("checkpoints")  # checkpoints/step-NNNNNN/
    marker = _Entry(MARKER_NAME)               # peftkit's ownership marker, written by `fresh`

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))  # a str or any os.PathLike is taken too

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        """The folder's name (trackers name the run after it)."""
        return self.path.name

    def result(self, trains_base: bool) -> Path:
        """Where the trained result goes: model/ for a method that trains the base (full, freeze), else adapter/."""
        return self.model if trains_base else self.adapter

    def checkpoint(self, step: int) -> Path:
        """The folder of the checkpoint after optimizer step `step`."""
        return self.checkpoints_folder / f"step-{step:06d}"

    @classmethod
    def position_file(cls, checkpoint: Path) -> Path:
        """A checkpoint's position file, the last one written: a checkpoint without it is incomplete."""
        return Path(checkpoint) / cls.POSITION

    @classmethod
    def holding(cls, checkpoint: Path) -> RunDir:
        """The run folder a checkpoint folder belongs to."""
        return cls(Path(checkpoint).parent.parent)

    # -- checkpoints --------------------------------------------------------------------------------------------

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest step first (by number, not by name); anything else under checkpoints/ is
        skipped: files, symbolic links, other names, folders without their position file."""
        return [folder for _, folder in sorted(self._scan()[0])]

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    def earlier_checkpoint(self, checkpoint: Path) -> Path | None:
        """The newest complete checkpoint of an earlier step than `checkpoint`, or None."""
        step = self.step_of(checkpoint)
        earlier = [c for c in self.checkpoints() if step is not None and (self.step_of(c) or 0) < step]
        return earlier[-1] if earlier else None

    @staticmethod
    def step_of(checkpoint: Path) -> int | None:
        """The step a checkpoint folder's name says (None for a name that is not step-<digits>)."""
        match = STEP_NAME.fullmatch(Path(checkpoint).name)
        return int(match.group(1)) if match else None

    def prunable(self, keep: int) -> list[Path]:
        """The checkpoints to delete so that the newest `keep` remain: only those peftkit wrote (its marker)."""
        return [c for c in self.checkpoints()[:-keep] if written_by_peftkit(c)] if keep > 0 else []

    def _scan(self) -> tuple[list[tuple[int, Path]], list[str]]:
        """([(step, complete checkpoint)], [why each other entry of checkpoints/ is skipped])."""
        root = self.checkpoints_folder
        if root.is_symlink() or not root.is_dir():
            return [], []
        found, skipped = [], []
        for entry in root.iterdir():
            if entry.name.startswith("."):
                continue  # a temporary of a checkpoint being written (io.fs.atomic_dir cleans up killed ones)
            step = self.step_of(entry)
            if step is None or entry.name != self.checkpoint(step).name:
                skipped.append(f"{entry.name} (not a step-NNNNNN name)")
            elif entry.is_symlink() or not entry.is_dir():
                skipped.append(f"{entry.name} (a {'symbolic link' if entry.is_symlink() else 'file'}, not a folder)")
            elif not self.position_file(entry).is_file():
                skipped.append(f"{entry.name} (incomplete: no {self.POSITION})")
            else:
                found.append((step, entry))
        return found, sorted(skipped)

    # -- which folder a run uses, and what it resumes from ------------------------------------------------------

    @classmethod
    def default(cls, method: str) -> RunDir:
        """runs/<method>-<date>-<time>: the folder of a run given no --output."""
        return cls(Path("runs") / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}")

    @classmethod
    def rescue(cls) -> RunDir:
        """A folder in the system's temporary folder for a result the run folder could not take (a full disk)."""
        return cls(Path(tempfile.gettempdir()) / f"peftkit-rescue-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")

    @classmethod
    def locate(cls, cfg: TrainConfig) -> tuple[RunDir, Path | None]:
        """(run folder, resume_from): the checkpoint to continue from with `resume`, else None after checking that
        the folder may take a new run. Refusals are one-line PeftkitErrors; nothing is written.

        `resume` with no `output` resumes the newest runs/<method>-* folder.
        """
        run_dir = cls.chosen(cfg)
        if cfg.resume:
            return run_dir, run_dir.resume_from(cfg)
        run_dir.check_fresh(cfg)
        return run_dir, None

    @classmethod
    def chosen(cls, cfg: TrainConfig) -> RunDir:
        """The folder `cfg` runs in: --output, else (resume) the newest runs/<method>-*, else a new default name."""
        if cfg.output:
            return cls(Path(cfg.output))
        return cls._newest_run(cfg.method) if cfg.resume else cls.default(cfg.method)

    @staticmethod
    def _newest_run(method: str) -> RunDir:
        """The newest runs/<method>-<date>-<time> folder (names sort by time); none is a one-line error."""
        found = sorted(p for p in Path("runs").glob(f"{method}-*") if p.is_dir() and not p.is_symlink())
        if not found:
            raise PeftkitError(f"--resume: no run folder runs/{method}-* to resume; pass --output RUN_FOLDER")
        return RunDir(found[-1])

    def resume_from(self, cfg: TrainConfig) -> Path:
        """The newest complete checkpoint, once the run's saved options are found to match `cfg`'s."""
        root = self.checkpoints_folder
        if root.is_symlink() or (root.exists() and not root.is_dir()):
            raise PeftkitError(f"--resume: {root} is a {'symbolic link' if root.is_symlink() else 'file'}, not the "
                               "checkpoints folder peftkit writes; move it away or resume another --output")
        found, skipped = self._scan()
        if skipped:
            log.warning("--resume: skipping %s in %s", ", ".join(skipped), root)
        if not found:
            raise PeftkitError(f"--resume: {self} holds no {'complete ' if skipped else ''}checkpoint (checkpoints are "
                               "saved every --save-steps)")
        self.check_same_run(cfg)
        return max(found)[1]

    def check_same_run(self, cfg: TrainConfig) -> None:
        """Resuming with different model / data / hyper-parameters would silently train something else: refuse."""
        if not self.config.is_file():
            return
        saved = read_recipe(self.config)
        now = cfg.to_dict()
        diff = [k for k in saved if k not in RESUME_MAY_CHANGE and saved[k] != now.get(k)]
        if diff:
            shown = ", ".join(f"{k}: {saved[k]!r} -> {now.get(k)!r}" for k in diff[:4])
            raise PeftkitError(f"--resume: the options differ from the run in {self} ({shown}); resume with the "
                               f"original options (saved in {self.config})")

    def check_fresh(self, cfg: TrainConfig) -> None:
        """A new run may write here: a valid target, and empty or (with --overwrite) a run peftkit wrote."""
        self.check_place(cfg)
        if self.path.exists() and any(self.path.iterdir()):
            if not cfg.overwrite:
                raise PeftkitError(f"output folder {self} is not empty (it holds another run); pass --overwrite to "
                                   "replace it, --resume to continue it, or choose another --output")
            check_replaceable(self.path, str(self))

    def check_place(self, cfg: TrainConfig) -> None:
        """The folder's place may hold a run: not a link, a file, a protected folder or one of the run's inputs."""
        check_target(self.path, inputs=[_local(cfg.model), _local(cfg.data), _local(cfg.eval_data)])

    # -- creating it --------------------------------------------------------------------------------------------

    @contextmanager
    def fresh(self, enabled: bool = True) -> Iterator[None]:
        """Create the run folder (with peftkit's marker) for the block; call it only after every input was validated.

        A previous run there (allowed by `check_fresh` only with --overwrite) is renamed aside, not deleted, and
        removed only when the new run completes. If the new run fails before its first checkpoint, what it wrote is
        removed (a folder with only a config and metrics must not pass for a run) and the previous run is put back;
        if it fails later, both are kept (the new one can be resumed) and a warning names where the previous one
        is. `enabled=False` (a resumed run, other processes of a distributed run) does nothing.
        """
        if not enabled:
            yield
            return
        remove_stale_temporaries(self.path)
        previous = None
        if self.path.exists() and any(self.path.iterdir()):  # named so that io.fs recognises it (".NAME.prev-PID-")
            previous = self.path.parent / f".{self.name}.prev-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self.path.rename(previous)
        existed = self.path.is_dir()  # the user's empty folder: emptied again, not removed, if the run fails
        self.path.mkdir(parents=True, exist_ok=True)
        write_marker(self.path, "train")
        try:
            yield
        except BaseException:
            if previous is not None:
                self._keep_previous(previous)
            elif not self.checkpoints():
                for item in self.path.iterdir() if existed else [self.path]:
                    shutil.rmtree(item, True) if item.is_dir() and not item.is_symlink() else item.unlink(True)
                log.warning("the run failed before its first checkpoint; removed what it wrote in %s", self)
            raise
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)

    def _keep_previous(self, previous: Path) -> None:
        """After a failed --overwrite run: restore the previous run, or keep both when the new one can be resumed."""
        if not self.checkpoints():
            shutil.rmtree(self.path, ignore_errors=True)
            previous.rename(self.path)
            log.warning("the new run failed; the previous run in %s is back in place", self)
            return
        kept = self.path.parent / f"{self.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}"
        previous.rename(kept)
        log.warning("the new run failed after writing checkpoints (continue it with --resume); the previous run "
                    "that --overwrite would have replaced is kept in %s", kept)


def _local(source: str | None) -> str | None:
    """A model / data argument as a local path when it is one (hub names are not inputs on this disk)."""
    return source if source is not None and Path(source).expanduser().exists() else None
