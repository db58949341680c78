"""HF PEFT's on-disk LoRA format, read and written in one place (the trainer's export, `combine`, `compress` and
the streaming merge all go through here).

Writing: `peft_lora_config` is the one builder of adapter_config.json (the fields PEFT 0.21 writes) and
`lora_tensors` the one namer of tensor keys (`base_model.model.<path>.lora_A.weight`, `.lora_B.weight`,
`.lora_B.bias`, and DoRA's `.lora_magnitude_vector`). Reading: `parse_keys` maps keys back to modules and
`lora_config_from_json` turns a saved config into a LoraConfig, refusing what peftkit does not implement (QALoRA,
BD-LoRA) with the same message everywhere. Unlike PEFT, nothing is dropped silently: the modules to adapt come from the tensor keys themselves,
every key must be understood, every module must exist in the model, and every shape must fit, before anything is
injected.
"""

from __future__ import annotations

import logging
import re
from typing import TypeVar, cast

import torch
from torch import nn

from peftkit.core.archs import LINEAR_TYPES
from peftkit.core.inject import base_modules
from peftkit.core.method import PEFT_PREFIX
from peftkit.errors import PeftkitError
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.layer import LoraLayer

log = logging.getLogger(__name__)
UNSUPPORTED_FLAGS = ("use_qalora", "use_bdlora")
T = TypeVar("T")

# <path>.lora_A.weight, <path>.lora_B.weight, <path>.lora_B.bias, <path>.lora_magnitude_vector (DoRA); PEFT strips
# the adapter name but older files may keep it (<path>.lora_A.default.weight, lora_magnitude_vector.default.weight).
_KEY = re.compile(r"^(?P<path>.+)\.(?:(?P<part>lora_A|lora_B)(?:\.[^.]+)?\.(?P<kind>weight|bias)"
                  r"|lora_magnitude_vector(?:\.[^.]+)??(?:\.weight)?)$")


def parse_keys(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, str]]:
    """{module path: {"A": key, "B": key, "bias": key}} from the saved keys; unknown keys are an error."""
    out: dict[str, dict[str, str]] = {}
    missing_prefix = False
    for key in tensors:
        match = _KEY.match(key)
        if match is None or (match["part"] == "lora_A" and match["kind"] == "bias"):
            raise PeftkitError(
                f"adapter tensor {key!r} is not a LoRA weight (expected <module>.lora_A.weight / .lora_B.weight / "
                ".lora_magnitude_vector); "
                "peftkit loads every tensor or refuses the file"
            )
        path = match["path"]
        if path.startswith(PEFT_PREFIX):
            path = path[len(PEFT_PREFIX):]
        else:
            missing_prefix = True
        slot = "m" if match["part"] is None else "bias" if match["kind"] == "bias" else match["part"][-1]
        out.setdefault(path, {})[slot] = key
    if missing_prefix:
        log.warning("adapter keys lack the %r prefix (HF PEFT would load nothing); loaded them anyway", PEFT_PREFIX)
    return out


def lora_config_from_json(config_json: dict, keys: dict[str, dict[str, str]], where: str = "the adapter") -> LoraConfig:
    """The LoraConfig of a saved adapter: ranks, alphas (with their patterns), rsLoRA and dropout from the JSON;
    the modules from the tensor keys (`parse_keys`), so it re-creates exactly the saved modules."""
    for flag in UNSUPPORTED_FLAGS:
        if config_json.get(flag):
            raise PeftkitError(f"{where} uses {flag}, which peftkit does not implement; use a plain LoRA adapter")
    if config_json.get("target_parameters"):  # methods/lora/param_targets.py reads those, for load_adapter only
        raise PeftkitError(f"{where} adapts parameters (target_parameters: MoE experts), which only load_adapter "
                           "reads; load it onto the model and merge in memory (peftkit.merge) instead")
    lora_bias = any("bias" in slots for slots in keys.values())
    use_dora = _dora_flag(config_json, keys, where)
    if lora_bias and not config_json.get("lora_bias"):
        log.warning("the adapter has lora_B.bias tensors but lora_bias is false; peftkit applies them (PEFT drops them)")
    number = (int, float)
    return LoraConfig(
        r=_field(config_json, "r", int, 8),
        lora_alpha=_field(config_json, "lora_alpha", number, 8),
        lora_dropout=_field(config_json, "lora_dropout", number, 0.0),
        target_modules="^(" + "|".join(re.escape(p) for p in keys) + ")$",
        use_rslora=_field(config_json, "use_rslora", bool, False),
        lora_bias=lora_bias,
        rank_pattern=_pattern(config_json, "rank_pattern", int),
        alpha_pattern=_pattern(config_json, "alpha_pattern", number),
        use_dora=use_dora,
    )


def _dora_flag(config_json: dict, keys: dict[str, dict[str, str]], where: str) -> bool:
    """use_dora from the config, checked against the tensors: every module has a magnitude vector, or none has."""
    use_dora = _field(config_json, "use_dora", bool, False)
    with_m = [p for p, slots in keys.items() if "m" in slots]
    if use_dora and len(with_m) != len(keys):
        missing = next(p for p in keys if p not in with_m)
        raise PeftkitError(f"{where} sets use_dora but module {missing!r} has no lora_magnitude_vector; the file is "
                           "incomplete")
    if with_m and not use_dora:
        raise PeftkitError(f"{where} has lora_magnitude_vector tensors (DoRA) but use_dora is false in "
                           "adapter_config.json; set it to true if the adapter was trained with DoRA")
    return use_dora


def saved_module_names(config_json: dict) -> list[str]:
    """The config's `modules_to_save`: a list of module names, or none."""
    names = config_json.get("modules_to_save") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise PeftkitError(f"adapter_config.json field 'modules_to_save' must be a list of module names, got {names!r}")
    return names


def _field(config_json: dict, key: str, kind: type[T] | tuple[type[T], ...], default: T) -> T:
    """A config field of the given JSON type (null = the default); anything else is an error naming the field."""
    value = config_json.get(key)
    if value is None:
        return default
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise PeftkitError(f"adapter_config.json field {key!r} has the wrong type: {value!r}")
    return value


def _pattern(config_json: dict, key: str, kind: type[float] | tuple[type[float], ...]) -> dict:
    """rank_pattern / alpha_pattern: module regex -> number."""
    patterns = _field(config_json, key, dict, {})
    for name, value in patterns.items():
        if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
            raise PeftkitError(f"adapter_config.json {key}[{name!r}] must be a positive number, got {value!r}")
        try:
            re.compile(name)
        except re.error as exc:
            raise PeftkitError(f"adapter_config.json {key} key {name!r} is not a valid regular expression ({exc})") from None
    return dict(patterns)


def peft_lora_config(*, r: int, lora_alpha: float, target_modules: list[str] | str, rank_pattern: dict | None = None,
                     alpha_pattern: dict | None = None, use_rslora: bool = False, lora_dropout: float = 0.0,
                     fan_in_fan_out: bool = False, lora_bias: bool = False, modules_to_save: list[str] | None = None,
                     base_model: str | None = None, use_dora: bool = False) -> dict:
    """adapter_config.json as HF PEFT 0.21 writes it for a causal-LM LoRA (`fan_in_fan_out` true when the targets
    are GPT-2 Conv1D layers, as PEFT sets it for them)."""
    return {
        "base_model_name_or_path": base_model,
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "target_modules": target_modules,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": dict(rank_pattern or {}),
        "alpha_pattern": dict(alpha_pattern or {}),
        "use_rslora": use_rslora,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "lora_bias": lora_bias,
        "use_dora": use_dora,
        "init_lora_weights": True,
        "modules_to_save": modules_to_save,
        "inference_mode": True,
        "revision": None,
    }


def one_rank(factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
             ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], int]:
    """Every module at the largest rank R: zero rows appended to A and zero columns to B, so B A is unchanged.

    Why one rank: for a module of rank r_m, HF PEFT applies alpha_m / r_m (alpha_pattern / rank_pattern), vLLM
    applies lora_alpha / r to every module (it reads neither pattern) and llama.cpp's GGUF adapters apply
    lora_alpha / (the tensor's own rank). With ranks that differ, vLLM's and llama.cpp's scales differ by r / r_m
    whatever alpha, patterns or factors folded into B are written, so no such adapter means the same in all three;
    at one rank, with no patterns, all three apply lora_alpha / R.
    """
    rank = max(a.shape[0] for a, _, _ in factors.values())
    padded = {}
    for path, (a, b, bias) in factors.items():
        extra = rank - a.shape[0]
        if extra:
            a = torch.cat([a, a.new_zeros(extra, a.shape[1])], 0)
            b = torch.cat([b, b.new_zeros(b.shape[0], extra)], 1)
        padded[path] = (a, b, bias)
    return padded, rank


def target_modules_for(paths: list[str], *, adaptable: list[str] | None = None,
                       names: list[str] | None = None) -> list[str] | str:
    """`target_modules` that selects exactly `paths` under PEFT's rule (a listed name matches a module path equal to
    it or ending in "." + it): the paths' last names (["q_proj", "v_proj"]) when they select no other module, else
    a regex of the full paths. Checked against `adaptable` (every linear module path of the base) or, without the
    base, `names` (the union of the source adapters' own target lists, each of which selected exactly its modules,
    so their union selects exactly the union of the modules)."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    if adaptable is not None:
        exact = {p for p in adaptable if p.rsplit(".", 1)[-1] in leaves} == set(paths)
    else:
        exact = names is not None and set(leaves) <= set(names)
    return leaves if exact else "^(" + "|".join(re.escape(p) for p in paths) + ")$"


def scale_one_config(rank: int, target_modules: list[str] | str, **fields) -> dict:
    """adapter_config.json for modules all of rank `rank` (`one_rank`) with scale 1 (alpha = r) and no rank /
    alpha patterns, the form of combined and compressed adapters: PEFT, vLLM and llama.cpp all read it alike."""
    return peft_lora_config(r=rank, lora_alpha=rank, target_modules=target_modules, **fields)


def lora_tensors(factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                 lora_bias: bool = False, magnitudes: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """PEFT's tensor keys for {module path: (A [r, in], B [out, r], B's bias or None)}. With `lora_bias` every
    module gets a `lora_B.bias` (zeros where it has none): in PEFT's format the bias is all or nothing. DoRA's
    `magnitudes` ({module path: m [out]}) are saved as `<path>.lora_magnitude_vector`, without ".weight", as PEFT
    saves them."""
    tensors = {}
    for path, (a, b, bias) in factors.items():
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b.contiguous()
        if lora_bias and bias is None:
            bias = torch.zeros(b.shape[0], dtype=b.dtype)
        if bias is not None:
            tensors[f"{PEFT_PREFIX}{path}.lora_B.bias"] = bias.contiguous()
    for path, magnitude in (magnitudes or {}).items():
        tensors[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = magnitude.contiguous()
    return tensors


def config_from_peft(
    model: nn.Module, config_json: dict, tensors: dict[str, torch.Tensor]
) -> tuple[LoraConfig, dict[str, dict[str, str]]]:
    """A LoraConfig that re-creates exactly the saved modules, after checking every tensor against the model."""
    keys = parse_keys(tensors)
    config = lora_config_from_json(config_json, keys)
    _check_shapes(model, config, tensors, keys)
    return config, keys


def _check_shapes(model: nn.Module, config: LoraConfig, tensors: dict, keys: dict[str, dict[str, str]]) -> None:
    """Every module must exist and be linear; A must be [r, d_in], B [d_out, r], B's bias and the DoRA magnitude [d_out]."""
    modules = dict(base_modules(model))
    for path, slots in keys.items():
        if "A" not in slots or "B" not in slots:
            raise PeftkitError(f"adapter has only one of lora_A / lora_B for module {path!r}; the file is incomplete")
        module = modules.get(path)
        base = getattr(module, "base_layer", module)
        if not isinstance(base, LINEAR_TYPES):
            what = "does not exist in" if module is None else f"is a {type(base).__name__} in"
            raise PeftkitError(
                f"adapter tensor {slots['A']!r} targets module {path!r}, which {what} this model "
                "(was the adapter trained for another base model?)"
            )
        w = base.weight
        d_out, d_in = (w.shape[1], w.shape[0]) if not isinstance(base, nn.Linear) else (base.out_features, base.in_features)
        r, _ = config.rank_alpha(path)
        expected = {"A": (r, d_in), "B": (d_out, r), "bias": (d_out,), "m": (d_out,)}
        for slot, key in slots.items():
            if tuple(tensors[key].shape) != expected[slot]:
                raise PeftkitError(
                    f"adapter tensor {key!r} has shape {tuple(tensors[key].shape)} but the model needs "
                    f"{expected[slot]} (r={r}, module {d_in}->{d_out}); the adapter does not fit this model"
                )


def load_lora_tensors(model: nn.Module, tensors: dict, keys: dict[str, dict[str, str]], name: str) -> None:
    """Copy the checked tensors into the freshly injected adapter `name`."""
    with torch.no_grad():
        for path, slots in keys.items():
            layer = cast(LoraLayer, model.get_submodule(path))  # the caller injected adapter `name` here
            layer.factor_a(name).weight.copy_(tensors[slots["A"]])
            layer.factor_b(name).weight.copy_(tensors[slots["B"]])
            if "bias" in slots:
                layer.factor_b(name).bias.copy_(tensors[slots["bias"]])
            if "m" in slots:
                layer.lora_magnitude_vector[name].copy_(tensors[slots["m"]])
