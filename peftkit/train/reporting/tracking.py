"""Experiment trackers (`--report-to tensorboard,wandb,mlflow`) through accelerate's trackers.

    names = tracker_names("tensorboard,wandb")     # validated: known and installed, else a one-line error
    acc = Accelerator(log_with=names, project_dir=...)     # precision.make_accelerator(..., log_with=names)
    tracking = Tracking.start(acc, run_dir.tracking, run_dir.name, config)  # RUN/tracking/, the config as hparams
    tracking.log("train", {"step": 3, "loss": 1.2, ...})    # every numeric field as "train/loss" at step 3
    tracking.finish()

`report.Metrics` calls `log` for every record it writes to metrics.jsonl, so a tracker sees exactly the scalars of
metrics.jsonl. Everything is written by the main process only, inside the run folder: TensorBoard event files in
RUN/tracking/<project>/, the W&B run in RUN/tracking/wandb/ (offline with WANDB_MODE=offline), MLflow's file
store in RUN/tracking/mlruns/ unless MLFLOW_TRACKING_URI says otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError

PROJECT = "peftkit"    # TensorBoard sub-folder, W&B project, MLflow experiment
# tracker -> (module that must be importable, what to pip install)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}


def parse_report_to(value: str | list[str] | None) -> list[str]:
    """Tracker names from "tensorboard,wandb", ["tensorboard", "wandb"], "none" (no trackers) or "all" (every
    installed one, as HF's report_to); unknown names are an error listing the valid ones."""
    items = value if isinstance(value, list) else [value or "none"]
    names: list[str] = []
    for item in items:
        for name in str(item).split(","):
            name = name.strip().lower()
            if name in ("", "none"):
                continue
            if name == "all":
                names += [n for n, (module, _) in TRACKERS.items()
                          if n not in names and importlib.util.find_spec(module) is not None]
                continue
            if name not in TRACKERS:
                raise PeftkitError(f"unknown tracker {name!r} in report_to; use none, all or any of "
                                   f"{', '.join(TRACKERS)} (comma-separated)")
            if name not in names:
                names.append(name)
    return names


def tracker_names(value: str | list[str] | None) -> list[str]:
    """parse_report_to, and each tracker's package installed (checked before anything is written)."""
    names = parse_report_to(value)
    for name in names:
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise PeftkitError(f"--report-to {name} needs the {package} package: pip install {package} "
                               "(or pip install 'peftkit[trackers]' for all of them)")
    return names


class Tracking:
    """The accelerator's trackers for one run (main process only; `None` stands for "no trackers")."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    @classmethod
    def start(cls, accelerator: Any, folder: Path, run_name: str, config: dict[str, Any]) -> Tracking | None:
        """Start the trackers named at the accelerator's creation, writing into `folder` (the run folder's
        `RunDir.tracking`), name the run `run_name` and record `config` (the run config) as its hyper-parameters.
        None when no tracker was asked for."""
        if not accelerator.log_with:
            return None
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        accelerator.project_configuration.set_directories(str(folder))
        accelerator.project_configuration.logging_dir = str(folder)  # set_directories keeps an earlier one
        init = {"wandb": {"dir": str(folder), "name": run_name}, "mlflow": {"run_name": run_name}}
        if "mlflow" in [str(name) for name in accelerator.log_with]:
            _default_mlflow_store(folder)
        try:
            accelerator.init_trackers(PROJECT, config=flat_config(config), init_kwargs=init)
        except Exception as exc:  # noqa: BLE001 - a tracker's own failure (no W&B login, an unreachable server)
            names = ", ".join(str(name) for name in accelerator.log_with)
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise PeftkitError(f"--report-to {names}: the tracker did not start ({text}); for W&B run `wandb login` "
                               "or set WANDB_MODE=offline, for MLflow check MLFLOW_TRACKING_URI") from None
        return cls(accelerator)

    def log(self, kind: str, record: dict[str, Any]) -> None:
        """The numeric fields of a metrics.jsonl record as "<kind>/<field>" at its step."""
        values = {f"{kind}/{key}": float(value) for key, value in record.items()
                  if key != "step" and _is_number(value)}
        if values:
            self.accelerator.log(values, step=int(record["step"]))

    def finish(self) -> None:
        """Flush and close every tracker (not `accelerator.end_training()`: that also ends a distributed run's
        process group, which the trainer still uses)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers = []


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """The run config with only str / int / float / bool / None values (what TensorBoard's hparams and MLflow's
    params take): mappings and lists become their JSON text."""
    return {key: value if value is None or isinstance(value, (str, int, float, bool)) else json.dumps(value)
            for key, value in config.items()}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _default_mlflow_store(folder: Path) -> None:
    """MLflow writes to MLFLOW_TRACKING_URI when set, else to a file store in RUN/tracking/mlruns (not ./mlruns;
    MLflow 3 refuses file stores unless MLFLOW_ALLOW_FILE_STORE=true, which is then set for this process)."""
    import os

    import mlflow

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((folder / "mlruns").resolve().as_uri())
