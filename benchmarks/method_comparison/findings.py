"""The report's findings: four published claims about PEFT, each checked against this comparison's numbers.

A difference counts only when it is larger than the seeds' spread (the wider min-max range of the two settings);
otherwise the verdict is "inconclusive". Each line states the numbers it rests on.
"""

from __future__ import annotations

from typing import Any

from experiments import LORA_ALPHA, RANKS_FULL, RANKS_QUICK, RSLORA_ALPHA, rank_name

Row = dict[str, Any]


def _row(rows: list[Row], name: str) -> Row | None:
    return next((r for r in rows if r["experiment_name"] == name), None)


def _spread(*rows: Row) -> float:
    return max(r["test_accuracy_max"] - r["test_accuracy_min"] for r in rows)


def _acc(r: Row) -> str:
    return f"{r['test_accuracy']:.1%} ({r['test_accuracy_min']:.0%}-{r['test_accuracy_max']:.0%})"


def _verdict(gap: float, spread: float, *rows: Row) -> str:
    """'yes' for a gap beyond the seed spread, 'no' for one beyond it the other way, else inconclusive; a setting
    run with one seed has no spread to judge by, so it is inconclusive."""
    if min(r["seeds"] for r in rows) < 2:
        return "inconclusive (one seed)"
    return "yes" if gap > spread else "no" if gap < -spread else "inconclusive"


def _compare(better: Row, worse: Row) -> str:
    """Whether `better` beats `worse` on test accuracy beyond the seeds' spread (`_verdict`)."""
    return _verdict(better["test_accuracy"] - worse["test_accuracy"], _spread(better, worse), better, worse)


def all_linear(rows: list[Row]) -> str | None:
    qv, all_ = _row(rows, "lora-qv-r16"), _row(rows, "lora-all-r3")
    if not (qv and all_):
        return None
    return (f"all-linear r=3 ({all_['num_trainable_params']:,} parameters) {_acc(all_)} vs q,v r=16 "
            f"({qv['num_trainable_params']:,}) {_acc(qv)}: reproduced: {_compare(all_, qv)}")


def lr_ratio(rows: list[Row]) -> str | None:
    full = _row(rows, "full-finetuning")
    loras = [r for r in rows if r["experiment_name"] in ("lora-qv-r16", "lora-all-r3", "lora-all-r8")]
    if not (full and loras):
        return None
    if full["lr_from"] != "sweep":
        return f"not measured on this task: its learning rates are {full['lr_from']}'s (--quick sweeps the first task only)"
    ratios = [r["lr"] / full["lr"] for r in loras]
    ok = all(3 <= x <= 30 for x in ratios)
    edge = any(r["lr"] in (min(r["lrs_tried"]), max(r["lrs_tried"])) for r in [full, *loras]
               if r["lr_from"] == "sweep")
    listed = ", ".join(f"{r['experiment_name']} {r['lr']:g} ({r['lr'] / full['lr']:.0f}x)" for r in loras)
    return (f"best lr: full fine-tuning {full['lr']:g} (of {', '.join(f'{x:g}' for x in full['lrs_tried'])}); "
            f"{listed}: reproduced (3-30x): {'yes' if ok else 'no'}"
            + ("; a best lr sits at the edge of its grid, so the true optimum may lie outside it" if edge else ""))


def rank_scaling(rows: list[Row]) -> str | None:
    """Each rule's accuracy from r=8 (the lead, where both rules give the same model) to the largest rank run."""
    ranks = sorted({r for r in (*RANKS_FULL, *RANKS_QUICK) if _row(rows, rank_name(r, False))
                    and _row(rows, rank_name(r, True))})
    if len(ranks) < 2 or 8 not in ranks:
        return None
    top = ranks[-1]
    lead, lo, rs = _row(rows, rank_name(8, False)), _row(rows, rank_name(top, False)), _row(rows, rank_name(top, True))
    assert lead and lo and rs
    gain_lo, gain_rs = lo["test_accuracy"] - lead["test_accuracy"], rs["test_accuracy"] - lead["test_accuracy"]
    verdict = _verdict(gain_rs - gain_lo, _spread(lead, lo, rs), lead, lo, rs)
    steps = "; ".join(f"r={r}: LoRA {_acc(_row(rows, rank_name(r, False)))}, rsLoRA {_acc(_row(rows, rank_name(r, True)))}"
                      for r in ranks if r != 8)
    return (f"all linears at lr {lead['lr']:g}, LoRA alpha {LORA_ALPHA:g} and rsLoRA alpha {RSLORA_ALPHA:.2f} (both "
            f"the lead at r=8: {_acc(lead)}); {steps}. Gain from r=8 to r={top}: LoRA {gain_lo:+.1%}, rsLoRA "
            f"{gain_rs:+.1%}: reproduced: {verdict}")


def forgetting(rows: list[Row]) -> str | None:
    full = _row(rows, "full-finetuning")
    loras = [r for r in rows if r["peft_type"] == "lora" and not r["experiment_name"].startswith("dora")]
    if not (full and loras):
        return None
    lora = max(loras, key=lambda r: r["test_accuracy"])
    learns = _compare(full, lora)
    spread = max(r["forgetting_max"] - r["forgetting_min"] for r in (full, lora))
    forgets = _verdict(full["forgetting"] - lora["forgetting"], spread, full, lora)
    return (f"full fine-tuning {_acc(full)}, forgetting {full['forgetting']:+.3f}; best LoRA ({lora['experiment_name']}) "
            f"{_acc(lora)}, forgetting {lora['forgetting']:+.3f}: LoRA learns less: {learns}; LoRA forgets less: "
            f"{forgets}")


CLAIMS = [
    ("LoRA on all linear layers beats attention-only LoRA at equal parameters (LoRA without regret)", all_linear),
    ("LoRA wants a learning rate about 10x full fine-tuning's (LoRA without regret)", lr_ratio),
    ("rsLoRA keeps gaining with rank where LoRA saturates (Kalajdzievski 2023)", rank_scaling),
    ("LoRA learns less and forgets less than full fine-tuning (Biderman et al. 2024)", forgetting),
]


def findings(tables: dict[str, list[Row]]) -> list[str]:
    """Markdown lines: each claim, then per task the numbers and the verdict (or that the runs are missing)."""
    out = ["## Findings", ""]
    for i, (claim, check) in enumerate(CLAIMS, 1):
        out.append(f"{i}. **{claim}**")
        for task, rows in tables.items():
            line = check(rows)
            out.append(f"   - `{task}`: {line if line else 'not measured (its experiments did not run or failed)'}")
    return out
