"""LoRA's config dataclass and the helpers that interpret its target / pattern fields."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from peftkit.core.method_options import ALPHA, DROPOUT, RANK
from peftkit.errors import PeftkitError

INITS = ("default", "gaussian", "pissa", "olora", "eva")  # PEFT's init_lora_weights names ("default" is its True)
PARAMETER_INITS = ("default", "gaussian")  # the inits that need no base weight: what parameter targets take


@dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters, named as in loralib / HF PEFT.

    target_modules: None (the architecture's defaults), a list of module names / suffixes, a regex matched against
    the full module path, or "all-linear". lora_alpha None means 2 * r. rank_pattern / alpha_pattern map a module
    regex (matched against the end of the path) to its own rank / alpha, as in PEFT. use_dora: DoRA (Liu et al.
    2024), a learned magnitude per output row on top of the LoRA direction (`dora.py`). init: one of `inits` (PEFT's
    init_lora_weights names; `inits.py`, `eva.py`); eva_rho / eva_tau: EVA's rank budget factor (a layer gets at
    most round(r * rho)) and its convergence threshold (PEFT's EvaConfig rho / tau).
    """

    inits: ClassVar[tuple[str, ...]] = INITS

    r: int = 8
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | None = None
    use_rslora: bool = False
    init: str = "default"
    lora_bias: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    target_parameters: tuple[str, ...] | None = None
    eva_rho: float = 2.0
    eva_tau: float = 0.99

    def __post_init__(self) -> None:
        object.__setattr__(self, "r", RANK.check(self.r, required=True))  # the options --rank / lora_r also check
        object.__setattr__(self, "lora_alpha", ALPHA.check(self.lora_alpha))
        if self.lora_alpha is None:
            object.__setattr__(self, "lora_alpha", 2 * self.r)
        object.__setattr__(self, "lora_dropout", DROPOUT.check(self.lora_dropout, required=True))
        if self.init not in self.inits:
            hint = " (loftq needs a quantized base: --method qlora)" if self.init == "loftq" else ""
            raise PeftkitError(f"unknown LoRA init {self.init!r}; choose one of {', '.join(self.inits)}{hint}")
        if isinstance(self.eva_rho, bool) or not isinstance(self.eva_rho, (int, float)) or self.eva_rho < 1:
            raise PeftkitError(f"eva_rho must be a number >= 1 (1: no rank redistribution), got {self.eva_rho!r}")
        if isinstance(self.eva_tau, bool) or not isinstance(self.eva_tau, (int, float)) or not 0 <= self.eva_tau <= 1:
            raise PeftkitError(f"eva_tau must be a cosine similarity in [0, 1], got {self.eva_tau!r}")
        object.__setattr__(self, "target_modules", normalize_targets(self.target_modules))
        if not isinstance(self.use_dora, bool):
            raise PeftkitError(f"use_dora must be true or false, got {self.use_dora!r}")
        if self.use_dora and self.lora_bias:
            raise PeftkitError("use_dora cannot be combined with lora_bias (as in PEFT): DoRA's row norm has no place "
                               "for a bias; drop one of them")
        object.__setattr__(self, "target_parameters", _parameter_targets(self))
        if self.layers_to_transform is not None:
            layers = self.layers_to_transform
            object.__setattr__(self, "layers_to_transform", (layers,) if isinstance(layers, int) else tuple(layers))
        for key, rank in self.rank_pattern.items():  # ranks too: RANK's bounds
            replace(RANK, name=f"rank_pattern[{key!r}]").check(rank, required=True)

    @property
    def alpha(self) -> float:
        """`lora_alpha` as built: `__post_init__` fills a None with 2 * r, so it is never None here."""
        assert self.lora_alpha is not None
        return self.lora_alpha

    def rank_alpha(self, path: str) -> tuple[int, float]:
        """(r, alpha) for the module at `path`, after rank_pattern / alpha_pattern (PEFT's suffix-regex rule)."""
        return _pattern_value(self.rank_pattern, path, self.r), _pattern_value(self.alpha_pattern, path, self.alpha)


def normalize_targets(targets: Any, field: str = "target_modules") -> tuple[str, ...] | str | None:
    """Accept None, "all-linear", a regex, a comma list "q_proj,v_proj", or a list of names; lists become tuples.
    Anything else (a number, a mapping, a list holding non-names) is an error naming `field`."""
    if targets is None:
        return targets
    if isinstance(targets, str):
        if targets == "all-linear":
            return targets
        if re.search(r"[\\^$*+?()\[\]|{}]", targets):
            try:
                re.compile(targets)
            except re.error as exc:
                raise PeftkitError(f"{field} {targets!r} is not a valid regular expression ({exc}); give "
                                   "module names (q_proj,v_proj), all-linear, or a valid regex") from None
            return targets
        return tuple(t.strip() for t in targets.split(",") if t.strip())
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
        raise PeftkitError(f"{field} must be module names (a list or q_proj,v_proj), all-linear or a regex; got "
                           f"{targets!r}")
    return tuple(targets)


def _parameter_targets(config: LoraConfig) -> tuple[str, ...] | None:
    """`target_parameters` as a tuple of names (a comma list or a list given), refusing what PEFT's parameter LoRA
    refuses: dropout (it cannot be applied to a weight), DoRA, a LoRA bias and the inits that read the base weight."""
    names = config.target_parameters
    if names is None or names == ():
        if config.target_modules == ():
            raise PeftkitError("target_modules is empty and target_parameters unset: nothing to adapt; name modules "
                               "or parameters")
        return None
    if isinstance(names, str):  # "a,b" or, from `--set target_parameters=[a, b]`, "[a, b]"
        names = tuple(n.strip(" '\"") for n in names.strip().strip("[]").split(",") if n.strip(" '\""))
    names = tuple(names)
    if not all(isinstance(n, str) and n for n in names):
        raise PeftkitError(f"target_parameters must be parameter names (mlp.experts.gate_up_proj), got {names!r}")
    refused = {"lora_dropout > 0": config.lora_dropout > 0, "use_dora": config.use_dora,
               "lora_bias": config.lora_bias, f"init {config.init!r}": config.init not in PARAMETER_INITS}
    for what, given in refused.items():
        if given:
            raise PeftkitError(f"target_parameters cannot be combined with {what} (as in PEFT: the update is added to "
                               f"the weight itself); drop it, or use init {' / '.join(PARAMETER_INITS)}")
    return names


def _pattern_value(patterns: dict, path: str, default: Any) -> Any:
    """PEFT's rule: the first pattern key k with re.match(rf"(.*\\.)?{k}$", path) gives the value."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", path):
            return value
    return default
