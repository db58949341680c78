"""End to end on the embedded model: full fine-tune, compress at several ranks, merge, eval; one table.

    python benchmarks/compress_e2e.py [--ranks 4,16,64 --steps 60 --workdir /tmp/compress_e2e]

Drives the CLI only, exactly as a user would:
    peftkit train --method full --max-steps N -o RUN          (the bundled task)
    peftkit compress --finetuned RUN/<model> --rank R -o ADAPTER_R
    peftkit merge -a ADAPTER_R -o MERGED_R
    peftkit eval --model M --json                            (base, fine-tune, each merged model)
and prints rank, adapter size (MB = 10^6 bytes) and the eval score against the full fine-tune and the base.
`peftkit eval`'s JSON is expected to hold "exact_match" and/or "loss".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PEFTKIT = [sys.executable, "-m", "peftkit.cli"]


def cli(*args: str) -> str:
    proc = subprocess.run([*PEFTKIT, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"peftkit {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def evaluate(model: str) -> dict:
    out = cli("eval", "--model", model, "--json")
    data = json.loads(out[out.index("{"):])
    return {k: data.get(k) for k in ("exact_match", "loss")}


def model_folder(run: Path) -> Path:
    """The saved full model inside a train run folder (the folder holding config.json + safetensors)."""
    for config in sorted(run.rglob("config.json")):
        if any(config.parent.glob("*.safetensors")):
            return config.parent
    raise SystemExit(f"no saved model under {run}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", default="4,16,64")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--workdir", default="/tmp/compress_e2e")
    args = parser.parse_args()
    work = Path(args.workdir)
    run = work / "full"
    if not run.exists():
        cli("train", "--method", "full", "--max-steps", str(args.steps), "-o", str(run), "--quiet")
    finetuned = model_folder(run)
    rows = [("base", "-", evaluate("smollm2-135m")), ("full fine-tune", "-", evaluate(str(finetuned)))]
    for rank in [int(r) for r in args.ranks.split(",")]:
        adapter, merged = work / f"adapter-r{rank}", work / f"merged-r{rank}"
        cli("compress", "--finetuned", str(finetuned), "--rank", str(rank), "-o", str(adapter), "--overwrite")
        cli("merge", "-a", str(adapter), "-o", str(merged), "--overwrite")
        size = (adapter / "adapter_model.safetensors").stat().st_size / 1e6
        rows.append((f"LoRA r={rank}", f"{size:.1f}", evaluate(str(merged))))
    print(f"{'model':<16} {'adapter MB':>10} {'exact match':>12} {'eval loss':>10}")
    for name, size, score in rows:
        em = "-" if score["exact_match"] is None else f"{score['exact_match']:.3f}"
        loss = "-" if score["loss"] is None else f"{score['loss']:.4f}"
        print(f"{name:<16} {size:>10} {em:>12} {loss:>10}")


if __name__ == "__main__":
    main()
