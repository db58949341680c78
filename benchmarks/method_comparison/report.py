"""The method comparison's report: results/TASK/*.json -> docs/method_comparison.md and three plots.

    python benchmarks/method_comparison/run.py --report-only     # rebuilds both from the committed results

Per task and experiment, the lr is the one with the lowest validation loss on the first seed (never chosen on the
test split); the table gives that lr's test accuracy over every seed run at it (mean, and min-max), forgetting,
train time, tokens/s, peak memory, trainable parameters and saved size. findings.py turns the same rows into the
report's four findings.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from findings import findings


def load_results(folder: Path) -> list[dict[str, Any]]:
    """Every result file under `folder` (results/TASK/NAME--lrX--seedN.json), successful or not."""
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*/*.json"))]


def _ok(rows: Iterable[dict], task: str, name: str) -> list[dict]:
    return [r for r in rows if r["run_info"]["task_name"] == task and r["run_info"]["experiment_name"] == name
            and r["train_info"]["status"] == "success"]


def best_lr(rows: list[dict], task: str, name: str, lrs: Iterable[float], seed: int) -> float | None:
    """The lr of `lrs` whose first-seed run has the lowest validation loss (None: none succeeded)."""
    first = [r for r in _ok(rows, task, name) if r["run_info"]["seed"] == seed and r["run_info"]["lr"] in set(lrs)]
    return min(first, key=lambda r: r["train_info"]["valid_loss"])["run_info"]["lr"] if first else None


def summarise(rows: list[dict], task: str, name: str) -> dict[str, Any] | None:
    """One table row: the experiment at its best lr (the lowest validation loss of the lowest seed), over its seeds."""
    ok = _ok(rows, task, name)
    if not ok:
        return None
    first_seed = min(r["run_info"]["seed"] for r in ok)
    lr = best_lr(rows, task, name, {r["run_info"]["lr"] for r in ok}, first_seed)
    runs = [r["train_info"] for r in ok if r["run_info"]["lr"] == lr]
    acc = [t["test_accuracy"] for t in runs]
    return {
        "experiment_name": name, "task_name": task, "peft_type": ok[0]["run_info"]["peft_type"], "lr": lr,
        "lrs_tried": sorted({r["run_info"]["lr"] for r in ok}), "seeds": len(runs),
        "test_accuracy": statistics.mean(acc), "test_accuracy_min": min(acc), "test_accuracy_max": max(acc),
        "forgetting": statistics.mean(t["forgetting"] for t in runs),
        "forgetting_min": min(t["forgetting"] for t in runs), "forgetting_max": max(t["forgetting"] for t in runs),
        "lr_from": ok[0]["run_info"].get("lr_from", "sweep") if len({r["run_info"]["lr"] for r in ok}) == 1 else "sweep",
        "valid_loss": statistics.mean(t["valid_loss"] for t in runs),
        "train_time": statistics.median(t["train_time"] for t in runs),
        "tokens_per_s": statistics.median(t["tokens_per_s"] for t in runs),
        "accelerator_memory_max": max(t["accelerator_memory_max"] for t in runs),
        "num_trainable_params": runs[0]["num_trainable_params"], "file_size": runs[0]["file_size"],
    }


def table(rows: list[dict], task: str) -> list[dict[str, Any]]:
    names = sorted({r["run_info"]["experiment_name"] for r in rows if r["run_info"]["task_name"] == task})
    summaries = [s for s in (summarise(rows, task, n) for n in names) if s]
    return sorted(summaries, key=lambda s: -s["test_accuracy"])


def _markdown(summaries: list[dict], failed: list[dict]) -> list[str]:
    lines = ["| experiment | test accuracy (min-max) | forgetting | lr | train s | tokens/s | peak memory | "
             "trainable | saved |", "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        tried = "of " + ", ".join(f"{x:g}" for x in s["lrs_tried"]) if s["lr_from"] == "sweep" else s["lr_from"] + "'s"
        lines.append(
            f"| {s['experiment_name']} | {s['test_accuracy']:.1%} ({s['test_accuracy_min']:.0%}-"
            f"{s['test_accuracy_max']:.0%}, {s['seeds']} seed{'s' if s['seeds'] > 1 else ''}) | {s['forgetting']:+.3f} | {s['lr']:g} ({tried}) | "
            f"{s['train_time']:.0f} | {s['tokens_per_s']:.0f} | {s['accelerator_memory_max'] / 2**30:.2f} GiB | "
            f"{s['num_trainable_params']:,} | {s['file_size'] / 2**20:.2f} MiB |")
    lines += [f"| {r['run_info']['experiment_name']} lr {r['run_info']['lr']:g} seed {r['run_info']['seed']} | failed: "
              f"{r['run_info'].get('error_msg', '?')} | | | | | | | |" for r in failed]
    return lines


def _setup(rows: list[dict]) -> list[str]:
    """Report lines on the machine, the versions and the training settings (from the newest successful run)."""
    ok = [r for r in rows if r["train_info"]["status"] == "success"]
    if not ok:
        return []
    meta, cfg = ok[-1]["meta_info"], ok[-1]["run_info"]["train_config"]
    system = meta["system_info"]
    return [f"- machine: {system['accelerator']}, {system['processor']}, {system['cpu_threads']} threads per run, "
            f"{system['platform']}",
            "- versions: " + ", ".join(f"{k.removesuffix('-version')} {v}" for k, v in meta["package_info"].items()),
            f"- model: {cfg.get('model') or 'the embedded SmolLM2-135M-Instruct'}; every run: {cfg['max_steps']} "
            f"steps of {cfg['batch_size']} rows, max_length {cfg['max_length']}, AdamW, {cfg['scheduler']} schedule, "
            f"warmup {cfg['warmup']}, precision {cfg['precision']}"]


PUBLISHED = Path(__file__).resolve().parent / "peft_published.json"


def beside_peft(tables: dict[str, list[dict]]) -> list[str]:
    """HF PEFT's published method comparison (peft_published.json) next to the closest peftkit experiment on each
    task: a 3B model after 5000 steps against a 135M model after 30, so the rankings are what can be
    compared, not the accuracies."""
    published = json.loads(PUBLISHED.read_text())
    tasks = list(tables)
    out = ["## Beside HF PEFT's published comparison", "",
           f"PEFT's numbers: {published['setting']} ({published['source']}). The peftkit column is the closest "
           "experiment of this comparison (its targets and ranks differ: see experiments.py); \"-\" = not in this "
           "run (the full mode has it).", "",
           "| PEFT experiment | setting | PEFT test accuracy | peftkit experiment | " + " | ".join(f"`{t}`" for t in tasks)
           + " |", "|---|---|---|---|" + "---|" * len(tasks)]
    for r in published["results"]:
        ours = [next((f"{s['test_accuracy']:.1%}" for s in tables[t] if s["experiment_name"] == r["peftkit"]), "-")
                for t in tasks]
        out.append(f"| {r['experiment_name']} | {r['setting']} | {r['test_accuracy']:.1%} | {r['peftkit']} | "
                   + " | ".join(ours) + " |")
    for task in tasks:
        both = [(r, s) for r in published["results"] for s in tables[task] if s["experiment_name"] == r["peftkit"]]
        if len(both) >= 2:
            ranked = [" > ".join(s["experiment_name"] for _, s in sorted(both, key=lambda pair: -pair[side]["test_accuracy"]))
                      for side in (0, 1)]
            out += ["", f"- `{task}`, the experiments both have, best first: PEFT {ranked[0]}; peftkit {ranked[1]}"]
    return out


def write_report(results: Path, docs: Path, how: dict[str, Any]) -> list[Path]:
    """Write docs/method_comparison.md and docs/images/method_comparison/*.png from every result; returns paths."""
    from plots import plot_all

    rows = load_results(results)
    tasks = [t for t in how["tasks"] if any(r["run_info"]["task_name"] == t for r in rows)]
    tables = {task: table(rows, task) for task in tasks}
    created = sorted(r["run_info"].get("created_at", "") for r in rows)
    total = sum(r["run_info"].get("total_time", 0) for r in rows)
    out = ["# Method comparison on the bundled tasks", "",
           "Written by `python benchmarks/method_comparison/run.py" + (" --quick" if how["quick"] else "") + "` "
           "(benchmarks/method_comparison/README.md says what it runs); do not edit by hand.", "",
           f"- runs: {len(rows)} ({sum(r['train_info']['status'] != 'success' for r in rows)} failed), "
           f"{total / 60:.0f} min of run time summed over the runs, {created[0][:16] if created else '?'} to {created[-1][:16] if created else '?'} UTC",
           f"- seeds: {', '.join(map(str, how['seeds']))}", *_setup(rows), ""]
    out += findings(tables)
    out += ["", *beside_peft(tables)]
    for task in tasks:
        failed = [r for r in rows if r["run_info"]["task_name"] == task and r["train_info"]["status"] != "success"]
        out += ["", f"## Task `{task}`", "", *_markdown(tables[task], failed), "",
                f"![accuracy vs trainable parameters, forgetting and train time](images/method_comparison/{task}.png)"]
    out += ["", "## Columns", "",
            "test accuracy: greedy exact match on the held-out split, mean over the seeds at the chosen lr; forgetting: "
            "mean token loss on bundled general text (peftkit/data/general_text.jsonl) minus the base model's, as "
            "`peftkit eval` reports it (positive = worse); lr: chosen by the lowest validation loss of the first seed "
            "(validation = rows drawn like the test split's, none of them a test row), or in --quick the family lead's "
            "(\"lead X's\"); train s: the training "
            "loop's wall time (median); peak memory: the run process's peak resident memory on CPU, the CUDA "
            "allocator's peak on a GPU; saved: the size of the adapter (or model) safetensors."]
    docs.mkdir(parents=True, exist_ok=True)
    report = docs / "method_comparison.md"
    report.write_text("\n".join(out) + "\n")
    return [report, *plot_all(tables, docs / "images" / "method_comparison")]
