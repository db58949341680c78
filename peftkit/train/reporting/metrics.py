"""What a run shows and leaves behind: the progress bar, metrics.jsonl and loss_curve.png (and the trackers).

metrics.jsonl has one JSON object per line: {"kind": "train", "step", "loss", "lr", "grad_norm", "tokens_per_s",
...} per optimizer step, {"kind": "eval", "step", "loss", "exact_match", ...} per evaluation. With `--report-to`,
every record also goes to the trackers (`tracking.Tracking.log`: its numeric fields as "train/loss", ...). On
resume the lines after the checkpoint's step are dropped first, so the file always describes one consistent run.
Where the files are is the run folder's business (`rundir.RunDir.metrics`, `.curve`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.train.checkpoints.rundir import RunDir
from peftkit.train.reporting.tracking import Tracking


class Metrics:
    """Append-only metrics.jsonl (main process only; other processes get a writer that does nothing).

    `keep_until`: the step of the checkpoint a resumed run continues from; records after it are dropped (they are
    redone). None (a fresh run) starts a new file.
    """

    def __init__(self, run_dir: RunDir, enabled: bool, keep_until: int | None = None,
                 tracking: Tracking | None = None) -> None:
        self.path = run_dir.metrics
        self.enabled = enabled
        self.tracking = tracking if enabled else None
        self._last_write = time.perf_counter()
        if enabled and keep_until is not None and self.path.is_file():
            kept = [record for record in read_records(self.path) if record.get("step", 0) <= keep_until]
            self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))
        elif enabled and keep_until is None and self.path.exists():
            self.path.unlink()

    def write(self, kind: str, record: dict[str, Any]) -> None:
        """Append one record and send it to the trackers. A train record gains `tokens_per_s`: the step's tokens
        over the wall time since the previous record (so an evaluation in between is not counted as training)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if kind == "train" and "step_tokens" in record:
            record = {**record, "tokens_per_s": record["step_tokens"] / max(now - self._last_write, 1e-9)}
        with self.path.open("a") as f:
            f.write(json.dumps({"kind": kind, **record}) + "\n")
        self._last_write = time.perf_counter()
        if self.tracking is not None:
            self.tracking.log(kind, record)

    def close(self) -> None:
        """Flush and close the trackers."""
        if self.tracking is not None:
            self.tracking.finish()
            self.tracking = None

    def read(self) -> list[dict[str, Any]]:
        return read_records(self.path)

    def earlier_eval(self, step: int) -> dict[str, Any]:
        """The evaluation recorded at `step` before an interruption (resume does not evaluate the base again)."""
        found = [r for r in self.read() if r["kind"] == "eval" and r["step"] == step]
        return {k: v for k, v in found[-1].items() if k not in ("kind", "step")} if found else {}


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl ([] when there is none); a line that is not a JSON object with a "kind" and
    an integer "step" is a one-line PeftkitError naming the file and the line (resume checks it before starting)."""
    if not path.is_file():
        return []
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise PeftkitError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); it should be one JSON "
                           "record per line, as peftkit writes it") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            record, why = None, exc.msg
        except RecursionError:
            record, why = None, "nested deeper than a JSON reader goes"
        else:
            why = "not a record with a kind and an integer step"
        if not (isinstance(record, dict) and isinstance(record.get("kind"), str)
                and type(record.get("step")) is int):
            raise PeftkitError(f"{path} line {number} is damaged ({why}); each line should be one JSON record as "
                               "peftkit writes it: remove or repair that line")
        records.append(record)
    return records


def plot_loss(records: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Training loss per step (and eval loss points) as a PNG, drawn with matplotlib's headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    evals = [(r["step"], r["loss"]) for r in records if r["kind"] == "eval" and r.get("loss") is not None]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o", label="eval loss (at the steps it was measured)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def preference_text(record: dict[str, Any]) -> str:
    """A preference step's reward accuracy and margin for the progress line ("" for SFT)."""
    if "rewards/accuracies" not in record:
        return ""
    return f"reward acc {record['rewards/accuracies']:.0%} margin {record['rewards/margins']:.3f}"


class Progress:
    """A rich progress bar: step, loss, useful tokens/s, ETA. Disabled on non-main processes or when quiet."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.bar = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as Bar

        self.bar = Bar(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                       TextColumn("{task.fields[tps]} tok/s"), TextColumn("{task.fields[extra]}"), TextColumn("ETA"),
                       TimeRemainingColumn())
        self.task = self.bar.add_task("train", total=total, completed=start, loss="-", tps="-", extra="")
        self.bar.start()
        self._t0, self._tokens0 = None, 0

    def update(self, record: dict[str, Any]) -> None:
        if self.bar is None:
            return
        if self._t0 is None:  # measure speed from the first finished step (it includes warm-up costs otherwise)
            self._t0, self._tokens0 = record["elapsed_s"], record["tokens"]
            tps = record["step_tokens"] / max(record["elapsed_s"], 1e-9)
        else:
            tps = (record["tokens"] - self._tokens0) / max(record["elapsed_s"] - self._t0, 1e-9)
        self.bar.update(self.task, completed=record["step"], loss=f"{record['loss']:.4f}", tps=f"{tps:,.0f}",
                        extra=preference_text(record))

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
