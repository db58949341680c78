"""The run folder: where a run writes, refusing a folder that holds another run, and what --resume continues.

A run folder holds run_config.yaml (the resolved config), metrics.jsonl, loss_curve.png, summary.json,
checkpoints/step-N/ and the result (adapter/ or model/). Nothing is created before every input was validated.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.train.checkpoint import list_checkpoints
from peftkit.train.config import TrainConfig, read_recipe

RUN_CONFIG = "run_config.yaml"


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
    if run_dir.exists() and any(run_dir.iterdir()) and not cfg.overwrite:
        raise PeftkitError(f"output folder {run_dir} is not empty (it holds another run); pass --overwrite to "
                           "replace it, --resume to continue it, or choose another --output")
    return run_dir, None


RESUME_MAY_CHANGE = {"resume", "overwrite", "output", "max_steps", "epochs", "save_steps", "eval_steps", "keep_checkpoints",
                     "dry_run"}


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


def start_run_dir(run_dir: Path, cfg: TrainConfig) -> None:
    """Create (or, with --overwrite, empty) the run folder; called only after every input was validated."""
    if cfg.overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
