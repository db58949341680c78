"""Print the analytic vs traced table (presets x methods x checkpointing x length) as Markdown.

    python benchmarks/memory_matrix.py            # uses tests/fixtures/memory/traces.json (refresh it first)

Columns: analytic tensor bytes (total minus the overhead row), traced tensor peak, their ratio, the traced phase.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

from peftkit.memory import estimate_memory

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "memory" / "traces.json"


def main() -> None:
    warnings.simplefilter("ignore")
    records = json.loads(FIXTURE.read_text())
    print("| preset | method | ckpt | seq | analytic GB | traced GB | ratio | traced peak in |")
    print("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for key, rec in records.items():
        preset, method, precision, ckpt, seq = key.split("|")
        ckpt, seq = ckpt.endswith("1"), int(seq.split("=")[1])
        if "error" in rec:
            print(f"| {preset} | {method} {precision} | {int(ckpt)} | {seq} | | | | trace failed: {rec['error'][:60]} |")
            continue
        est = estimate_memory(preset, method, precision=precision, seq_len=seq, gradient_checkpointing=ckpt)
        analytic = est.total_bytes - est.breakdown["overhead"]
        ratio = analytic / rec["peak_bytes"]
        worst = max(worst, abs(ratio - 1))
        print(f"| {preset} | {method} {precision} | {int(ckpt)} | {seq} | {analytic / 1e9:,.2f} | "
              f"{rec['peak_bytes'] / 1e9:,.2f} | {ratio:.3f} | {rec['peak_phase']} |")  # fmt: skip
    print(f"\nworst |analytic/traced - 1| = {worst:.3%}", file=sys.stderr)


if __name__ == "__main__":
    main()
