"""Which runtimes can load a saved adapter, and why not: HF PEFT, vLLM, llama.cpp (through its converter) and TGI.

Each verdict is "yes", "needs" (it loads once the user does something: a flag, a converter, an explicit base) or
"no", with the reasons. What each consumer does, read from its source:
- HF PEFT applies alpha_m / r_m per module (rank_pattern / alpha_pattern; rsLoRA: alpha_m / sqrt(r_m)), loads every
  PEFT type and modules_to_save; AutoPeftModel loads the base from `base_model_name_or_path`.
- vLLM (lora/peft_helper.py) takes LoRA only, applies lora_alpha / r (rsLoRA: / sqrt(r)) to every module and reads
  no pattern, refuses modules_to_save and DoRA, and an r above `max_lora_rank` (default 16, `--max-lora-rank`).
- llama.cpp's convert_lora_to_gguf.py writes lora_A / lora_B pairs and one alpha, stops at embedding / lm_head
  tensors and at anything else not a pair (biases); llama.cpp applies alpha / (the tensor's own rank), no rsLoRA.
- TGI (adapters/lora.py) reads only lora_A / lora_B, applies lora_alpha / r (rsLoRA aware) to every module, stacks a
  module type across layers (so one rank per type) and skips a type that some layer lacks.

An adapter those three cannot load because of its method (DoRA, or any other method peftkit can merge into the
weights) gets `convert_command`: the `peftkit convert` line that writes it as a plain LoRA.
"""

from __future__ import annotations

import math
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from peftkit.core.inject import matches
from peftkit.core.method import PEFT_PREFIX
from peftkit.core.registry import method_for_peft_type
from peftkit.errors import PeftkitError
from peftkit.io.adapters import read_adapter
from peftkit.methods.lora.format import lora_config_from_json, parse_keys, saved_module_names

CONSUMERS = ("HF PEFT", "vLLM", "llama.cpp", "TGI")
VLLM_MAX_LORA_RANK = 16  # vLLM's default --max-lora-rank
PEFT_TYPES = ("LORA", "PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "IA3", "ADALORA", "LOHA", "LOKR", "OFT", "BOFT",
              "VERA", "FOURIERFT", "BONE", "HRA", "LN_TUNING", "POLY", "XLORA", "ADAPTION_PROMPT", "MULTITASK_PROMPT_TUNING")


@dataclass
class Verdict:
    consumer: str
    status: str = "yes"  # yes | needs | no
    reasons: list[str] = field(default_factory=list)

    def add(self, status: str, reason: str) -> None:
        """Record a reason; the verdict is the worst status seen (no > needs > yes)."""
        order = ("yes", "needs", "no")
        self.status = max(self.status, status, key=order.index)
        self.reasons.append(reason)


@dataclass
class Portability:
    adapter: str
    peft_type: str
    verdicts: list[Verdict]
    convert_command: str | None = None  # how to make it a plain LoRA, when its method is what stops the runtimes

    @property
    def all_load(self) -> bool:
        """Every consumer loads it (some perhaps after a flag or with an explicit base)."""
        return all(v.status != "no" for v in self.verdicts)


def check_portability(path: str | os.PathLike) -> Portability:
    """The portability report of the adapter folder `path` (see the module docstring)."""
    config, tensors, _ = read_adapter(path)
    peft_type = str(config.get("peft_type"))
    verdicts = {name: Verdict(name) for name in CONSUMERS}
    _base_path(config, verdicts)
    _peft_rules(peft_type, config, verdicts)
    if peft_type != "LORA":
        _not_lora(peft_type, verdicts)
        _targets(config, _adapted_modules(tensors), verdicts)
    else:
        _lora(config, tensors, str(path), verdicts)
    return Portability(str(path), peft_type, list(verdicts.values()), _convert_command(str(path), peft_type, config))


def _convert_command(path: str, peft_type: str, config: dict) -> str | None:
    """`peftkit convert` for a DoRA adapter or one of another method peftkit can merge (None otherwise), at
    vLLM's default rank ceiling."""
    if peft_type == "LORA":
        convertible = bool(config.get("use_dora"))
    else:
        try:
            convertible = method_for_peft_type(peft_type).mergeable
        except PeftkitError:  # a type peftkit does not load
            return None
    if not convertible:
        return None
    out = path.rstrip("/") + "-lora"
    return f"peftkit convert {shlex.quote(path)} --to lora --rank {VLLM_MAX_LORA_RANK} -o {shlex.quote(out)}"


def _not_lora(peft_type: str, verdicts: dict[str, Verdict]) -> None:
    if peft_type == "PEFTKIT_ADAPTER":
        verdicts["HF PEFT"].add("no", "PEFTKIT_ADAPTER (bottleneck adapters) is peftkit's own type; only peftkit loads it")
    elif peft_type not in PEFT_TYPES:
        verdicts["HF PEFT"].add("no", f"peft_type {peft_type!r} is not a PEFT type")
    for name in ("vLLM", "llama.cpp", "TGI"):
        verdicts[name].add("no", f"it loads only LoRA adapters, not {peft_type}")


def _peft_rules(peft_type: str, config: dict, verdicts: dict[str, Verdict]) -> None:
    """The method's own account of what PEFT's loader refuses in its config (`Method.peft_refusal`)."""
    try:
        refusal = method_for_peft_type(peft_type).peft_refusal(config)
    except PeftkitError:  # a type peftkit does not load: `_not_lora` says what it can
        return
    if refusal:
        verdicts["HF PEFT"].add("no", refusal)


def _adapted_modules(tensors: dict) -> list[str]:
    """The module paths a non-LoRA adapter's tensors belong to: PEFT saves `<prefix><module path>.<name>[.weight]`
    (oft_R.weight, lokr_w1, ia3_l, ...); VeRA's shared `base_model.vera_A` / `vera_B` belong to none."""
    paths = {key.removeprefix(PEFT_PREFIX).removesuffix(".weight").rpartition(".")[0] for key in tensors
             if key.startswith(PEFT_PREFIX)}
    return sorted(p for p in paths if p)


def _base_path(config: dict, verdicts: dict[str, Verdict]) -> None:
    base = config.get("base_model_name_or_path")
    if isinstance(base, str) and Path(base).is_absolute():
        verdicts["HF PEFT"].add("needs", f"the base is recorded as the local path {base} (AutoPeftModel finds it only "
                                         "on this machine): load the base yourself, then PeftModel.from_pretrained")
        verdicts["llama.cpp"].add("needs", f"the base is recorded as the local path {base}: give the converter "
                                           "--base DIR (or use `peftkit export --format gguf --base DIR`)")


def _lora(config: dict, tensors: dict, where: str, verdicts: dict[str, Verdict]) -> None:
    vllm, cpp, tgi = verdicts["vLLM"], verdicts["llama.cpp"], verdicts["TGI"]
    tensors = _without_parameter_lora(config, tensors, verdicts)
    config = {**config, "target_parameters": None}
    if config.get("use_dora"):
        for v in (vllm, cpp, tgi):
            v.add("no", "DoRA (use_dora): it does not implement the magnitude vectors")
    saved = saved_module_names(config)
    if saved:
        vllm.add("no", f"modules_to_save ({', '.join(saved)}): vLLM requires none")
        cpp.add("no", f"modules_to_save ({', '.join(saved)}): a GGUF adapter holds only lora_a / lora_b pairs "
                      "(the converter stops at embed_tokens / lm_head)")
        tgi.add("no", f"modules_to_save ({', '.join(saved)}): TGI reads only lora_A / lora_B and ignores them")
    if config.get("bias", "none") != "none":
        for v in (vllm, cpp, tgi):
            v.add("no", f"bias={config['bias']!r}: it adds no trained base biases (only bias='none')")
    if any(k.endswith(".lora_B.bias") for k in tensors):
        if not config.get("lora_bias"):
            verdicts["HF PEFT"].add("no", "lora_B biases with lora_bias false: PEFT drops them")
        vllm.add("needs", "lora_B biases: vLLM reads them only with --enable-lora-bias (in versions that have it)")
        cpp.add("no", "lora_B biases: a GGUF adapter has no place for them")
        tgi.add("no", "lora_B biases: TGI ignores them")
    _targets(config, list(parse_keys({k: v for k, v in tensors.items() if ".lora_" in k})), verdicts)
    try:
        lora = lora_config_from_json(config, parse_keys({k: v for k, v in tensors.items() if ".lora_" in k}), where)
    except PeftkitError as exc:
        if not config.get("use_dora"):  # DoRA without magnitude vectors: PEFT computes them from the base
            for v in verdicts.values():
                v.add("no", f"the adapter cannot be read: {exc}")
        return
    _shapes(lora, tensors, verdicts)
    if config.get("use_dora"):
        return
    ranks = {m: tensors[slots["A"]].shape[0] for m, slots in parse_keys(
        {k: v for k, v in tensors.items() if ".lora_A" in k}).items()}
    _scales(lora, ranks, verdicts)
    _ranks(lora, ranks, verdicts)


def _without_parameter_lora(config: dict, tensors: dict, verdicts: dict[str, Verdict]) -> dict:
    """The tensors of LoRA on modules: those of LoRA on parameters (`target_parameters`, MoE experts) set apart.

    PEFT saves a parameter's pair under its owning module's path (`mlp.experts`, nested `base_layer.`s for the
    module's other targeted parameters), so a pair is a parameter's when that path ends with the module part of a
    listed name (`mlp.experts.down_proj`); a pair no name selects stays with the modules, where `_targets` says PEFT
    drops it. A name without a module part selects by the base's parameters, which check does not read."""
    names = config.get("target_parameters")
    if not isinstance(names, list) or not names:
        return tensors
    names = [n for n in names if isinstance(n, str)]
    owners = {n.rsplit(".", 1)[0] for n in names if "." in n}
    if any("." not in n for n in names):
        verdicts["HF PEFT"].add("needs", f"target_parameters {names} has a name without its module: which parameters "
                                         "it selects depends on the base; load it with the base to be sure")
    for v in ("vLLM", "llama.cpp", "TGI"):
        verdicts[v].add("no", "target_parameters (LoRA on parameters such as MoE experts): it loads LoRA on modules "
                              "only")

    def owned(key: str) -> bool:
        path = re.sub(r"(\.base_layer)*\.lora_[AB]\.weight$", "", key)
        return any(path == o or path.endswith("." + o) for o in owners)

    return {k: v for k, v in tensors.items() if not owned(k)}


def _shapes(lora, tensors: dict, verdicts: dict[str, Verdict]) -> None:
    """PEFT builds each module's lora_A as (r_m, in) and lora_B as (out, r_m) from the config, then loads the tensors
    into them: a pair whose inner sizes differ, or differ from the rank the config gives the module, is a size
    mismatch in every runtime."""
    for module, slots in parse_keys({k: v for k, v in tensors.items() if ".lora_" in k}).items():
        if "A" not in slots or "B" not in slots:
            continue
        a, b, rank = tuple(tensors[slots["A"]].shape), tuple(tensors[slots["B"]].shape), lora.rank_alpha(module)[0]
        if len(a) < 2 or len(b) < 2 or not a[0] == b[1] == rank:
            for v in verdicts.values():
                v.add("no", f"{module}: lora_A {a} and lora_B {b} do not fit the rank {rank} the config gives it "
                            "(a size mismatch when loaded)")
            return


def _targets(config: dict, modules: list[str], verdicts: dict[str, Verdict]) -> None:
    """PEFT builds the modules that `target_modules` selects (a list of names, or a regex matched in full; PEFT
    refuses other types and a selection of nothing) and then loads the tensors into them: every adapted module must
    be selected, else its trained tensors are dropped."""
    targets = config.get("target_modules")
    peft = verdicts["HF PEFT"]
    if targets is None or targets == "all-linear":  # None: PEFT's default targets for the architecture
        return
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        peft.add("no", f"target_modules is {targets!r}: PEFT needs a list of module names or a regular expression")
        return
    try:
        missed = [m for m in modules if not matches(m, targets)]
    except re.error as exc:
        peft.add("no", f"target_modules {targets!r} is not a valid regular expression ({exc})")
        return
    if missed and len(missed) == len(modules):
        peft.add("no", f"target_modules {targets!r} selects none of the adapted modules (e.g. {missed[0]}): PEFT "
                       "refuses an adapter whose targets match nothing")
    elif missed:
        peft.add("no", f"target_modules {targets!r} does not select {len(missed)} adapted module(s) (e.g. "
                       f"{missed[0]}): PEFT would not load their tensors")


def _scales(lora, ranks: dict[str, int], verdicts: dict[str, Verdict]) -> None:
    """Modules the runtimes apply at another strength than PEFT does (rank / alpha patterns, rsLoRA)."""
    root = math.sqrt if lora.use_rslora else (lambda r: r)
    one = lora.lora_alpha / root(lora.r)  # vLLM, TGI: one scale for every module
    wrong_one, wrong_cpp = {}, {}
    for module, rank in ranks.items():
        r_m, alpha_m = lora.rank_alpha(module)
        peft = alpha_m / root(r_m)
        if not math.isclose(one, peft, rel_tol=1e-6):
            wrong_one[module] = one / peft
        cpp = lora.lora_alpha / rank
        if not math.isclose(cpp, peft, rel_tol=1e-6):
            wrong_cpp[module] = cpp / peft
    if wrong_one:
        module, factor = next(iter(wrong_one.items()))
        reason = (f"it applies lora_alpha / {'sqrt(r)' if lora.use_rslora else 'r'} to every module and reads no "
                  f"rank_pattern / alpha_pattern: {len(wrong_one)} module(s) would be at another strength than in "
                  f"PEFT (e.g. {module} at {factor:.3g}x)")
        verdicts["vLLM"].add("no", reason)
        verdicts["TGI"].add("no", reason)
    if wrong_cpp:
        module, factor = next(iter(wrong_cpp.items()))
        verdicts["llama.cpp"].add(
            "needs", f"llama.cpp applies alpha / (the tensor's rank){', no rsLoRA' if lora.use_rslora else ''}: "
            f"convert_lora_to_gguf.py's file would put {len(wrong_cpp)} module(s) at another strength (e.g. {module} "
            f"at {factor:.3g}x); `peftkit export --format gguf` folds PEFT's scales into B")


def _ranks(lora, ranks: dict[str, int], verdicts: dict[str, Verdict]) -> None:
    """vLLM's rank ceiling; TGI's one rank per module type, present in every layer (the layers the adapter touches:
    the base's layer count is not in the adapter)."""
    top = max([lora.r, *ranks.values()])
    if top > VLLM_MAX_LORA_RANK:
        verdicts["vLLM"].add("needs", f"rank {top} is above vLLM's default max_lora_rank {VLLM_MAX_LORA_RANK}: start "
                                      f"it with --max-lora-rank {_vllm_rank(top)} (LLM(max_lora_rank=...))")
    by_type: dict[str, set[int]] = {}
    layers: dict[str, set[int]] = {}
    all_layers: set[int] = set()
    for module, rank in ranks.items():
        kind = module.rsplit(".", 1)[-1]
        by_type.setdefault(kind, set()).add(rank)
        match = re.search(r"\.(\d+)\.", module)
        if match:
            layers.setdefault(kind, set()).add(int(match[1]))
            all_layers.add(int(match[1]))
    mixed = sorted(k for k, r in by_type.items() if len(r) > 1)
    if mixed:
        verdicts["TGI"].add("no", f"TGI stacks a module type across layers, so each type needs one rank; "
                                  f"{', '.join(mixed)} have several")
    partial = sorted(k for k, seen in layers.items() if seen != all_layers)
    if partial:
        verdicts["TGI"].add("no", f"TGI skips a module type that some layer lacks: {', '.join(partial)} are adapted in "
                                  "only some layers")


def _vllm_rank(rank: int) -> int:
    """The smallest of vLLM's accepted max_lora_rank values that holds `rank`."""
    return next((v for v in (8, 16, 32, 64, 128, 256, 320, 512) if v >= rank), rank)
