"""The run folder: where a run writes, refusing a folder that holds another run, and what --resume continues.

A run folder holds run_config.yaml (the resolved config), metrics.jsonl, loss_curve.png, summary.json,
checkpoints/step-N/ and the result (adapter/ or model/). Nothing is created before every input was validated.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.io.fs import remove_stale_temporaries, write_marker
from peftkit.io.outputs import check_replaceable, check_target
from peftkit.train.checkpoint import list_checkpoints
from peftkit.train.config import TrainConfig, read_recipe

RUN_CONFIG = "run_config.yaml"
log = logging.getLogger(__name__)


def default_run_dir(method: str) -> Path:
    return Path("runs") / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_dir(cfg: TrainConfig) -> tuple[Path, Path | None]:
    """(run folder, checkpoint to resume or None), refusing a folder that holds another run (nothing is written).

    --resume with no --output resumes the newest runs/<method>-* folder.
    """
    if cfg.output:
        run_dir = Path(cfg.output)
    elif cfg.resume:
        found = sorted(Path("runs").glob(f"{cfg.method}-*"))
        if not found:
            raise PeftkitError(f"--resume: no run folder runs/{cfg.method}-* to resume; pass --output RUN_FOLDER")
        run_dir = found[-1]
    else:
        run_dir = default_run_dir(cfg.method)
    if cfg.resume:
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            raise PeftkitError(f"--resume: {run_dir} holds no checkpoint (checkpoints are saved every --save-steps)")
        _check_same_run(run_dir, cfg)
        return run_dir, ckpts[-1]
    check_target(run_dir, inputs=[_local(cfg.model), _local(cfg.data), _local(cfg.eval_data)])
    if run_dir.exists() and any(run_dir.iterdir()):
        if not cfg.overwrite:
            raise PeftkitError(f"output folder {run_dir} is not empty (it holds another run); pass --overwrite to "
                               "replace it, --resume to continue it, or choose another --output")
        check_replaceable(run_dir, str(run_dir))
    return run_dir, None


def _local(source: str | None) -> str | None:
    """A model / data argument as a local path when it is one (hub names are not inputs on this disk)."""
    return source if source is not None and Path(source).expanduser().exists() else None


# What a resumed run may change: where and how often it writes, how long it runs, what it reports to, and how fast it
# computes the same thing (attention kernel, compiling, shared prefixes); not the model, data, batches or hyper-parameters.
RESUME_MAY_CHANGE = {"resume", "overwrite", "output", "max_steps", "epochs", "save_steps", "eval_steps", "keep_checkpoints",
                     "dry_run", "report_to", "attention", "compile", "share_prefix"}


def _check_same_run(run_dir: Path, cfg: TrainConfig) -> None:
    """Resuming with different model / data / hyper-parameters would silently train something else: refuse."""
    saved_file = run_dir / RUN_CONFIG
    if not saved_file.is_file():
        return
    saved = read_recipe(saved_file)
    now = cfg.to_dict()
    diff = [k for k in saved if k not in RESUME_MAY_CHANGE and saved[k] != now.get(k)]
    if diff:
        shown = ", ".join(f"{k}: {saved[k]!r} -> {now.get(k)!r}" for k in diff[:4])
        raise PeftkitError(f"--resume: the options differ from the run in {run_dir} ({shown}); resume with the "
                           f"original options (saved in {saved_file})")


@contextmanager
def fresh_run_dir(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Create the run folder (with peftkit's marker) for the block; called only after every input was validated.

    A previous run there (allowed by `check_run_dir` only with --overwrite) is renamed aside, not deleted, and
    removed only when the new run completes. If the new run fails before its first checkpoint, the previous run
    is put back; if it fails later, both are kept (the new one can be resumed) and a warning names where the
    previous one is. `enabled=False` (other processes of a distributed run) does nothing.
    """
    if not enabled:
        yield
        return
    remove_stale_temporaries(run_dir)
    previous = None
    if run_dir.exists() and any(run_dir.iterdir()):
        previous = run_dir.parent / f".{run_dir.name}.prev-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        run_dir.rename(previous)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_marker(run_dir, "train")
    try:
        yield
    except BaseException:
        if previous is not None:
            _keep_previous(run_dir, previous)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def _keep_previous(run_dir: Path, previous: Path) -> None:
    """After a failed --overwrite run: restore the previous run, or keep both when the new one can be resumed."""
    if not list_checkpoints(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)
        previous.rename(run_dir)
        log.warning("the new run failed; the previous run in %s is back in place", run_dir)
        return
    kept = run_dir.parent / f"{run_dir.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}"
    previous.rename(kept)
    log.warning("the new run failed after writing checkpoints (continue it with --resume); the previous run "
                "that --overwrite would have replaced is kept in %s", kept)
