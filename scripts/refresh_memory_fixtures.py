"""Re-record the traced peaks the memory tests compare the analytic model against (tests/fixtures/memory/).

    python scripts/refresh_memory_fixtures.py            # every preset x method x checkpointing x seq (~10 min)
    python scripts/refresh_memory_fixtures.py qwen1.5-7b # one preset
    python scripts/refresh_memory_fixtures.py --method prompt   # one method's cells, every preset

Each record is one fake-tensor trace (peftkit.memory.step_trace.trace_memory) of batch 1. A cell whose step fails is
recorded with an "error" so the tests can say why; combinations TrainingSetup refuses get no cell. Mixture-of-experts
presets also get the MOE_CASES, whose keys end in the method options they set (`|target_parameters=...`).
Run it after changing the tracer, transformers, torch, or a method's modules.
"""

from __future__ import annotations

import argparse
import itertools
import json
import warnings
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.memory.presets import PRESETS, resolve_config
from peftkit.memory.shapes import model_shape
from peftkit.memory.step_trace import trace_memory
from peftkit.memory.training_setup import TrainingSetup

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "memory" / "traces.json"
CASES = [("full", "amp"), ("full", "bf16"), ("lora", "amp"), ("prefix", "amp"), ("adapter", "amp"), ("prompt", "amp"),
         ("ia3", "amp"), ("vera", "amp"), ("lokr", "amp"), ("loha", "amp"),
         ("oft", "amp")]
MOE_CASES = [("lora", "amp", {"target_parameters": "mlp.experts.gate_up_proj,mlp.experts.down_proj"})]
SEQS = (512, 2048)


def key(preset: str, method: str, precision: str, ckpt: bool, seq: int, options: dict | None = None) -> str:
    extra = "".join(f"|{k}={v}" for k, v in (options or {}).items())
    return f"{preset}|{method}|{precision}|ckpt={int(ckpt)}|seq={seq}{extra}"


def main(presets: list[str], methods: list[str] | None = None) -> None:
    records = json.loads(OUT.read_text()) if OUT.exists() else {}
    warnings.simplefilter("ignore")
    for preset in presets:
        config, _ = resolve_config(preset)
        cases = [(m, p, {}) for m, p in CASES] + (MOE_CASES if model_shape(config).experts else [])
        for (method, precision, options), ckpt, seq in itertools.product(cases, (False, True), SEQS):
            if methods and method not in methods:
                continue
            try:
                setup = TrainingSetup(method, precision, seq_len=seq, gradient_checkpointing=ckpt,
                                      method_options=options)
            except PeftkitError:
                continue  # a combination the estimator and trainer refuse (prefix + checkpointing): no cell
            k = key(preset, method, precision, ckpt, seq, options)
            try:
                r = trace_memory(config, setup)
                records[k] = {"peak_bytes": r.peak_bytes, "peak_phase": r.peak_phase, "seconds": round(r.seconds, 1)}
            except Exception as exc:  # noqa: BLE001 - recorded, so the test reports it instead of passing silently
                records[k] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            print(k, records[k], flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(dict(sorted(records.items())), indent=1) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Re-record the traced memory peaks the tests compare against.")
    parser.add_argument("presets", nargs="*", help="presets to trace (default: all)")
    parser.add_argument("--method", action="append", help="only this method's cells (repeatable)")
    args = parser.parse_args()
    main(args.presets or list(PRESETS), args.method)
