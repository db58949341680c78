"""How far a QLoRA model is from its full-precision base before training, with and without LoftQ (docs/methods.md).

    python scripts/measure_loftq.py [--model PATH] [--rank 16] [--prompts 8] [--iters 5]

Loads the base twice (fp32, and NF4 with fp32 compute), injects qlora (all linear layers, as LoftQ is meant) with init default (B = 0:
the quantized base itself) and with init loftq, and prints, over the first bundled eval prompts (each alone, no
padding): the mean |logit difference| to the fp32 model and the mean per-token KL(fp32 || quantized). It also prints
the weight error sum ||W - Q - s·B A||_F / sum ||W||_F over the adapted modules for 1 and --iters LoftQ alternations
(`peftkit.methods.loftq.loftq`, re-quantizing W - s·B A with the base's own bitsandbytes settings).
"""

from __future__ import annotations

import argparse
import json

import torch

import peftkit
from peftkit.core.method import InitData
from peftkit.core.registry import get_method
from peftkit.data import BUNDLED_EVAL
from peftkit.io.quantize import dequantized, quantization_record
from peftkit.methods.loftq import loftq
from peftkit.methods.lora.layer import LoraLayer
from peftkit.train.init_data import stored_weights


def _quantized(model_name: str | None, rank: int, init: str) -> torch.nn.Module:
    model, _ = peftkit.load_model(model_name, dtype="fp32", quantize="nf4")
    config = get_method("qlora").build_config({"rank": rank, "init": init, "target_modules": "all-linear"})
    peftkit.inject(model, config)
    get_method("qlora").initialise(model, config, "default", InitData(lambda: iter(()), stored_weights(model_name)))
    return model


@torch.no_grad()
def _logit_errors(model: torch.nn.Module, full: torch.nn.Module, prompts: list[torch.Tensor]) -> tuple[float, float]:
    diffs, kls = [], []
    for ids in prompts:
        ours, theirs = model(ids).logits.float(), full(ids).logits.float()
        diffs.append((ours - theirs).abs().mean())
        kls.append(torch.nn.functional.kl_div(ours.log_softmax(-1), theirs.log_softmax(-1), log_target=True,
                                              reduction="none").sum(-1).mean())
    return torch.stack(diffs).mean().item(), torch.stack(kls).mean().item()


@torch.no_grad()
def _weight_errors(model: torch.nn.Module, model_name: str | None, iters: int) -> dict[int, float]:
    record = quantization_record(model)
    assert record is not None
    weight = stored_weights(model_name)
    errors = {0: 0.0, 1: 0.0, iters: 0.0}  # 0: no adapter (W - quant(W))
    total = 0.0
    for path, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        w = weight(path).float()
        total += w.norm().item()
        errors[0] += (w - dequantized(w, record)).norm().item()
        for t in (1, iters):
            q, a, b = loftq(w, layer.factor_a("default").weight.shape[0], layer.scaling["default"],
                            lambda x: dequantized(x, record), t)
            errors[t] += (w - q - layer.scaling["default"] * b @ a).norm().item()
    return {t: e / total for t, e in errors.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model folder with safetensors weights (default: embedded)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    full, tokenizer = peftkit.load_model(args.model, dtype="fp32")
    rows = [json.loads(line) for line in BUNDLED_EVAL.read_text().splitlines()[: args.prompts]]
    vocab = full.config.vocab_size  # a tiny test model may have fewer tokens than its tokenizer: ids are folded in
    prompts = [tokenizer(f"{r['instruction']}\n{r['input']}\n{r['output']}", return_tensors="pt").input_ids % vocab
               for r in rows]
    for init in ("default", "loftq"):
        model = _quantized(args.model, args.rank, init)
        mean_abs, kl = _logit_errors(model, full, prompts)
        print(f"init {init:7}: mean |logit diff| {mean_abs:.4f}  KL(fp32 || nf4) {kl:.5f} per token")
    weights = _weight_errors(model, args.model, args.iters)
    print("relative weight error ||W - Q - sBA|| / ||W||: " + ", ".join(f"loftq_iter {t}: {e:.4f}" for t, e in weights.items()) + " (0: no adapter)")


if __name__ == "__main__":
    main()
