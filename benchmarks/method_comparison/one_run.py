"""One run of the method comparison, in its own process (so its peak memory is its own): train, score, write JSON.

    python benchmarks/method_comparison/one_run.py SPEC.json RESULT.json

SPEC holds the experiment name, task, lr, seed, the TrainConfig fields and the data files (train, validation,
test). The run trains with peftkit's own trainer (`peftkit.train.run.train`, exactly what `peftkit train` runs, with
no held-out pass of its own), then scores the trained model it hands back (`RunResult.trained`: still in memory,
as PEFT's method comparison scores it) with `peftkit eval`'s functions: greedy exact match on the test split, the
loss on the validation rows (the lr is chosen on it, never on the test split), the forgetting on bundled general
text against the base, and the saved parameters and bytes. RESULT follows the layout of HF PEFT's
method_comparison results (run_info / train_info / meta_info) so both can be read side by side.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def peak_memory() -> dict[str, int]:
    """The process's peak: CUDA's allocator peak on a GPU, else the peak resident set size (bytes)."""
    import torch

    if torch.cuda.is_available():
        return {"accelerator_memory_max": torch.cuda.max_memory_allocated(),
                "accelerator_memory_reserved_max": torch.cuda.max_memory_reserved()}
    return {"accelerator_memory_max": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def train_time(metrics_file: Path) -> tuple[float, int]:
    """Seconds of the training loop (its last `elapsed_s`) and the tokens it trained on, from metrics.jsonl."""
    last: dict[str, Any] = {}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        if "elapsed_s" in record:
            last = record
    return float(last["elapsed_s"]), int(last["tokens"])


def score(trained: Any, saved: Path, spec: dict) -> dict[str, Any]:
    """What `peftkit eval` reports, with the same functions and the same autocast, for the trained model
    (`trained`, a `Loaded`) and what it saved: exact match on the test split, validation loss, forgetting, saved
    size. The base's general-text loss is the same for every run of a comparison, so it is computed once
    (BASE_LOSS file beside the data) and reused."""
    from peftkit import data
    from peftkit.train.devices.precision import inference_autocast
    from peftkit.train.evaluation.forgetting import forgetting, general_text_loss, loss_on_rows, saved_weights
    from peftkit.train.evaluation.heldout import exact_match, references
    from peftkit.train.evaluation.loading import load_for_inference

    model, tokenizer, prompt_format = trained.model, trained.tokenizer, trained.prompt_format
    with inference_autocast(next(model.parameters()).device):
        base_loss = _cached(Path(spec["valid"]).parent.parent / "base_general_loss.json", spec["options"].get("model"),
                            lambda: general_text_loss(load_for_inference(spec["options"].get("model"), None).model,
                                                      tokenizer))
        test = exact_match(model, tokenizer, references(data.load_rows(spec["test"]), "alpaca"), prompt_format)
        out = {"test_accuracy": test["exact_match"], "test_examples": test["n"],
               "valid_loss": loss_on_rows(model, tokenizer, data.load_rows(spec["valid"]), "alpaca",
                                          prompt_format)["loss"]}
        out.update(forgetting(model, tokenizer, base_loss=base_loss))
    out.update(saved_weights(saved))
    return out


def _cached(path: Path, model: str | None, compute: Callable[[], float]) -> float:
    """The value stored in `path` for `model`, else computed and stored (atomically: runs may race)."""
    key = model or "embedded"
    stored = json.loads(path.read_text()) if path.is_file() else {}
    if key not in stored:
        stored[key] = compute()
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stored))
        os.replace(tmp, path)
    return float(stored[key])


def versions() -> dict[str, str]:
    import accelerate
    import datasets
    import torch
    import transformers

    import peftkit
    return {"peftkit-version": peftkit.__version__, "transformers-version": transformers.__version__,
            "torch-version": torch.__version__, "datasets-version": datasets.__version__,
            "accelerate-version": accelerate.__version__}


def main(spec_file: str, result_file: str) -> None:
    started = time.perf_counter()
    spec = json.loads(Path(spec_file).read_text())
    import torch

    from peftkit.core.registry import get_method
    from peftkit.train.config import TrainConfig
    from peftkit.train.run import train

    with tempfile.TemporaryDirectory(prefix="peftkit-compare-") as tmp:
        cfg = TrainConfig(**spec["options"], data=spec["train"], eval_split=0, lr=spec["lr"], seed=spec["seed"],
                          eval_before=False, output=str(Path(tmp) / "run"))
        started_training = time.perf_counter()
        result = train(cfg, progress=False)
        memory = peak_memory()
        seconds, tokens = train_time(Path(tmp) / "run" / "metrics.jsonl")
        saved = Path(str(result.saved))
        started_scoring = time.perf_counter()
        scores = score(result.trained, saved, spec)
        phases = {"startup_s": started_training - started, "train_call_s": started_scoring - started_training,
                  "score_s": time.perf_counter() - started_scoring}
    method = get_method(cfg.method)
    train_info = {
        "status": "success", "train_time": seconds, "train_total_tokens": tokens, "tokens_per_s": tokens / seconds,
        "file_size": scores.pop("saved_bytes"), "saved_parameters": scores.pop("saved_parameters"),
        "num_trainable_params": result.summary["trainable_parameters"], **memory,
        **scores,
        "train_loss": result.summary["last_train_loss"], **phases,
    }
    run_info = {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "total_time": time.perf_counter() - started, "experiment_name": spec["name"], "task_name": spec["task"],
                "lr": spec["lr"], "lr_from": spec["lr_from"], "seed": spec["seed"], "train_config": cfg.to_dict(),
                "peft_type": "full-finetuning" if method.trains_base else method.name}
    meta_info = {"package_info": versions(), "system_info": {"platform": platform.platform(), "processor":
                 platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
                 "accelerator": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}}
    Path(result_file).write_text(json.dumps({"run_info": run_info, "train_info": train_info, "meta_info": meta_info},
                                            indent=2, default=str) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
