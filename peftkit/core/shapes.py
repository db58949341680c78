"""The shapes of a Llama-style decoder (Llama, Qwen2, Mistral, ... and the mixture-of-experts Qwen3-MoE, Mixtral,
OLMoE) read from its config, its parameter counts, and what a method tells the memory estimator about itself
(`BaseTraining`, `SavedActivations`).

In core because two layers use them: the estimator (`peftkit.memory`) and the methods, whose memory hooks on
`peftkit.core.method.Method` receive a `ModelShape` (methods import only core). Everything the analytic estimator
needs is here: hidden size h, MLP size i, layers L, query heads n_h, key/value
heads n_kv, head_dim d, vocabulary V, whether the embeddings are tied, and the linear layers of one decoder layer
with their (d_in, d_out, bias). Parameter count (checked against the released models in the tests):

    total = V*h (embedding) + [V*h (lm_head) unless tied] + h (final norm)
          + L * (sum of the layer's linear weights and biases + 2*h (two RMSNorms) [+ the q / k norms])

A mixture-of-experts layer (E experts, top_k = k of them per token, expert MLP size i_e) has no MLP linears: its
experts are fused 3-D weights (E * 3 * h * i_e) and its router a weight [E, h], so `linears` holds only the
attention projections and `layer_params` adds E * (3 h i_e + h).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PretrainedConfig

from peftkit.core.archs import ARCHS, model_dims
from peftkit.errors import PeftkitError


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder layer: its module name, input and output sizes, and whether it has a bias."""

    name: str
    d_in: int
    d_out: int
    bias: bool

    @property
    def params(self) -> int:
        return self.d_in * self.d_out + (self.d_out if self.bias else 0)


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a decoder-only LM (see module docstring for the letters)."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    linears: tuple[Linear, ...]
    experts: int = 0  # E (0: a dense MLP)
    top_k: int = 0  # experts per token
    expert_intermediate: int = 0  # i_e, one expert's MLP size
    qk_norm: str = ""  # RMSNorms on q and k: "" none, "full" over their whole width (OLMoE), "head" per head (Qwen3)

    @property
    def kv_dim(self) -> int:
        """n_kv * d: the width of K and V (smaller than h under grouped-query attention)."""
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        experts = self.experts * (3 * self.hidden * self.expert_intermediate + self.hidden)
        qk_norms = {"": 0, "full": (self.heads + self.kv_heads) * self.head_dim, "head": 2 * self.head_dim}[self.qk_norm]
        return sum(lin.params for lin in self.linears) + 2 * self.hidden + experts + qk_norms

    @property
    def mlp_width(self) -> int:
        """The MLP width one token passes through: i, or k * i_e when k of the experts run on it."""
        return self.top_k * self.expert_intermediate if self.experts else self.intermediate

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        head = 0 if self.tied else self.embedding_params
        return self.embedding_params + head + self.hidden + self.layers * self.layer_params

    def linear(self, name: str) -> Linear:
        for lin in self.linears:
            if lin.name == name:
                return lin
        raise KeyError(name)

    @property
    def default_targets(self) -> tuple[str, ...]:
        """PEFT's default adapter targets of these layers (`core.archs`): q_proj, v_proj for every Llama-style model."""
        spec = ARCHS.get(self.model_type)
        names = {lin.name for lin in self.linears}
        return spec.lora_targets if spec is not None and set(spec.lora_targets) <= names else ("q_proj", "v_proj")

    def target_linears(self, targets: Sequence[str] | str) -> list[str]:
        """Names of this layer's linears that `targets` selects: "all-linear", a list of names, or a comma list.
        A name that is not one of the linears is an error listing them (a regex cannot be resolved on a shape)."""
        if isinstance(targets, str):
            targets = [targets] if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
        names = [lin.name for lin in self.linears]
        if list(targets) == ["all-linear"]:
            return names
        unknown = [t for t in targets if t not in names]
        if unknown:
            raise PeftkitError(f"target modules {unknown} are not linears of this model; it has: {', '.join(names)}")
        return list(targets)


@dataclass(frozen=True)
class BaseTraining:
    """Which of the base model's own weights a `trains_base` method trains (`Method.trained_base`).

    layers: how many decoder layers train, counted from the top (the layers below them save no activations).
    whole: every weight trains (full fine-tune), so the embeddings, the final norm and the head too.
    """

    layers: int
    whole: bool = False


@dataclass(frozen=True)
class SavedActivations:
    """Bytes per token a method's own modules save for backward, beyond what the frozen decoder saves
    (`Method.saved_activations`).

    per_layer: in every decoder layer (LoRA: the inputs of its A projections and its rank-r outputs).
    once: once per forward, whatever the layer count (prefix tuning: one boolean attention mask for all layers).
    weights_per_layer: bytes (not per token) every decoder layer saves whatever the token count: weight-sized
    tensors its forward builds and keeps for backward (LoKr / LoHa: each adapted linear's whole ΔW; LoRA on
    experts' weights: the whole W + ΔW; OFT: the tensors of each rotation's Cayley series); their gradient is as large, in flight while the layer's backward runs.
    """

    per_layer: int = 0
    once: int = 0
    weights_per_layer: int = 0


def _field(config: PretrainedConfig, name: str, source: str) -> int:
    value = getattr(config, name, None)
    if value is None:
        raise PeftkitError(f"{source} config lacks the field {name!r} that the estimate needs")
    if not isinstance(value, int) or value <= 0:
        raise PeftkitError(f"{source} config field {name!r} must be a positive integer, got {value!r}")
    return value


def model_shape(config: PretrainedConfig) -> ModelShape:
    """Read a `ModelShape` from a Llama-style config; missing or invalid fields are named in the error."""
    source = getattr(config, "model_type", "model")
    h = _field(config, "hidden_size", source)
    i = _field(config, "intermediate_size", source)
    n_h = _field(config, "num_attention_heads", source)
    _field(config, "num_hidden_layers", source)
    dims = model_dims(config)
    n_kv, d = dims["kv_heads"], dims["head_dim"]
    qkv_bias = bool(getattr(config, "attention_bias", False)) or source == "qwen2"
    mlp_bias = bool(getattr(config, "mlp_bias", False))
    experts, top_k, expert_i = _moe_sizes(config, source)
    linears = (
        Linear("q_proj", h, n_h * d, qkv_bias),
        Linear("k_proj", h, n_kv * d, qkv_bias),
        Linear("v_proj", h, n_kv * d, qkv_bias),
        Linear("o_proj", n_h * d, h, bool(getattr(config, "attention_bias", False))),
    ) + (() if experts else (
        Linear("gate_proj", h, i, mlp_bias),
        Linear("up_proj", h, i, mlp_bias),
        Linear("down_proj", i, h, mlp_bias),
    ))
    return ModelShape(
        model_type=source,
        hidden=h,
        intermediate=i,
        layers=_field(config, "num_hidden_layers", source),
        heads=n_h,
        kv_heads=n_kv,
        head_dim=d,
        vocab=_field(config, "vocab_size", source),
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        linears=linears,
        experts=experts,
        top_k=top_k,
        expert_intermediate=expert_i,
        qk_norm=QK_NORMS.get(source, ""),
    )


QK_NORMS = {"olmoe": "full", "olmo2": "full", "qwen3": "head", "qwen3_moe": "head"}  # RMSNorms on q and k


def _moe_sizes(config: PretrainedConfig, source: str) -> tuple[int, int, int]:
    """(E, k, i_e) of a mixture-of-experts config (num_experts / num_local_experts, num_experts_per_tok,
    moe_intermediate_size or intermediate_size); (0, 0, 0) for a dense one. Shared experts and dense layers among
    the sparse ones are not modelled: refused."""
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if not experts:
        return 0, 0, 0
    if getattr(config, "shared_expert_intermediate_size", None) or getattr(config, "mlp_only_layers", None) \
            or getattr(config, "decoder_sparse_step", 1) != 1:
        raise PeftkitError(f"{source}: the estimate models mixture-of-experts models whose every layer is sparse, "
                           "without shared experts; this config has dense layers or shared experts")
    i_e = getattr(config, "moe_intermediate_size", None) or _field(config, "intermediate_size", source)
    return _field(config, "num_experts" if getattr(config, "num_experts", None) else "num_local_experts", source), \
        _field(config, "num_experts_per_tok", source), i_e
