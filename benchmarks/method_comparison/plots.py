"""The comparison's plots: per task, test accuracy against trainable parameters, forgetting and train time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PANELS = [("num_trainable_params", "trainable parameters (log)", True),
          ("forgetting", "forgetting (general-text loss change; lower is better)", False),
          ("train_time", "train time, s", False)]


def plot_task(summaries: list[dict[str, Any]], task: str, path: Path) -> Path:
    """One PNG of three panels; each point is an experiment at its chosen lr, bars span its seeds' min-max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))
    for ax, (key, label, log) in zip(axes, PANELS, strict=True):
        for s in summaries:
            y = 100 * s["test_accuracy"]
            err = [[y - 100 * s["test_accuracy_min"]], [100 * s["test_accuracy_max"] - y]]
            ax.errorbar(s[key], y, yerr=err, fmt="o", ms=5, capsize=3,
                        color="tab:red" if s["peft_type"] == "full-finetuning" else "tab:blue")
            ax.annotate(s["experiment_name"], (s[key], y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log" if log else "linear")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy, %")
        ax.grid(alpha=0.3)
    fig.suptitle(f"task {task}: accuracy (mean over seeds, bars min-max) vs cost")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_all(tables: dict[str, list[dict[str, Any]]], folder: Path) -> list[Path]:
    return [plot_task(rows, task, folder / f"{task}.png") for task, rows in tables.items() if rows]
