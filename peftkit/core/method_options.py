"""The options several methods share, declared once: `rank`, `alpha`, `dropout`, `target_modules`,
`target_parameters`, `variant`, `reduction_factor`, `num_virtual_tokens`, `init` (no torch here: the CLI builds its
flags from them for `--help`).

A method maps the ones it reads to its config fields (`Method.option_fields`, e.g. LoRA's `{"rank": "r"}`), and its
config checks those fields with the same `Option` (`LoraConfig` checks `r` with `RANK`), so `--rank 70000`,
`--set r=70000`, a recipe's `lora_r: 70000` and `LoraConfig(r=70000)` give the same error line.
"""

from __future__ import annotations

from peftkit.core.options import Option

SIZE_HIGH = 1 << 16  # no rank, reduction factor or virtual-token count of a real run comes near it

RANK = Option("rank", int, help="Rank, the config's r (LoRA, VeRA: the update's rank; OFT: blocks per layer).", low=1,
              high=SIZE_HIGH, flags=("--rank", "-r"), aliases=("lora_rank", "lora_r"))
ALPHA = Option("alpha", float, help="LoRA alpha (default 2 x rank).", low=0, low_open=True, high=1e6,
               aliases=("lora_alpha",))
DROPOUT = Option("dropout", float, help="Adapter dropout in [0, 1).", low=0, high=1, high_open=True,
                 aliases=("lora_dropout",))
TARGET_MODULES = Option("target_modules", (str, list), help="Comma list of module names, a regex, or all-linear.",
                        aliases=("lora_target", "lora_target_modules"))
TARGET_PARAMETERS = Option("target_parameters", (str, list), help="LoRA on parameters, by name (PEFT's "
                           "target_parameters): MoE experts' fused 3-D weights, e.g. "
                           "mlp.experts.gate_up_proj,mlp.experts.down_proj; a router's mlp.gate.weight.")
VARIANT = Option("variant", str, help="Bottleneck adapter variant: houlsby | pfeiffer | parallel.",
                 choices=("houlsby", "pfeiffer", "parallel"))
REDUCTION_FACTOR = Option("reduction_factor", int, help="Bottleneck size = hidden / reduction factor.", low=1,
                          high=SIZE_HIGH)
INIT = Option("init", str, help="How the adapter starts. LoRA / QLoRA: default (Kaiming A, zero B) | gaussian | pissa | "
              "olora | eva (from the training data) | loftq (qlora); prefix / prompt: their own inits.")
NUM_VIRTUAL_TOKENS = Option("num_virtual_tokens", int, help="Prefix / prompt length.", low=1, high=SIZE_HIGH)

SHARED: dict[str, Option] = {o.name: o for o in (RANK, ALPHA, DROPOUT, TARGET_MODULES, TARGET_PARAMETERS, INIT, VARIANT,
                                                 REDUCTION_FACTOR, NUM_VIRTUAL_TOKENS)}
