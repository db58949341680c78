"""Prefix tuning (Li & Liang 2021, arXiv:2101.00190): learned keys and values in front of every attention layer.

Each layer l attends over [prefix K_l ; real K] and [prefix V_l ; real V], with P learned vectors per layer, per
K/V, per key-value head (grouped-query attention: kv_heads x head_dim, not heads x head_dim). The whole prefix is
one table [P, L * 2 * kv_heads * head_dim], laid out per row as [L0.K, L0.V, L1.K, L1.V, ...]: exactly HF PEFT's
`prompt_embeddings`. Trainable parameters: P * L * 2 * kv_heads * head_dim.

With `prefix_projection` (Li & Liang's reparameterization, which they found steadier to train) the table is the
output of an MLP  E [P, d_kv] -> Linear(d_kv, H) -> tanh -> Linear(H, L*2*d_kv). The MLP stays in the model's
parameters during training (so a checkpoint can resume); saving folds it away into the flat table, which is all
inference needs. The prefix reaches the model through a Cache pre-filled before the first forward
(see `virtual_tokens.py`); real tokens then take positions P, P+1, ... as in HF PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from transformers import Cache

from peftkit.core.archs import checkpointing_enabled, model_dims
from peftkit.core.inject import inject
from peftkit.core.method import Method, check_positive
from peftkit.core.method_options import NUM_VIRTUAL_TOKENS
from peftkit.core.registry import register
from peftkit.core.shapes import ModelShape, SavedActivations
from peftkit.core.state import adapters
from peftkit.errors import PeftkitError
from peftkit.methods.virtual_tokens import (
    VirtualTokenLayer,
    check_peft_prompt_config,
    input_embeddings,
    install,
    installed,
    peft_prompt_config,
)

PREFIX_INITS = ("vocab", "random", "zero")


@dataclass(frozen=True)
class PrefixConfig:
    """Prefix tuning hyper-parameters, named as in HF PEFT's PrefixTuningConfig.

    num_virtual_tokens: prefix length P. prefix_projection: train through the reparameterization MLP.
    encoder_hidden_size: the MLP's hidden width (None: kv_heads * head_dim, PEFT's default).
    init: "vocab" (default: the keys / values the model itself computes for P random vocabulary tokens, Li & Liang's
    real-word initialization, so training starts from a sensible model), "random" (N(0, 1), PEFT's default, which
    scrambles a pretrained model's attention at first) or "zero" (PEFT's init_weights="zero").
    """

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init: str = "vocab"

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_virtual_tokens", NUM_VIRTUAL_TOKENS.check(self.num_virtual_tokens, required=True))
        if self.encoder_hidden_size is not None:
            check_positive("encoder_hidden_size", self.encoder_hidden_size)
        if not isinstance(self.prefix_projection, bool):
            raise PeftkitError(f"prefix_projection must be true or false, got {self.prefix_projection!r}")
        if self.init not in PREFIX_INITS:
            raise PeftkitError(f"unknown prefix init {self.init!r}; choose one of {', '.join(PREFIX_INITS)}")


class PrefixEncoder(nn.Module):
    """Produces the prefix table [P, L*2*d_kv]: a flat embedding, or an embedding [P, d_kv] through an MLP."""

    def __init__(self, p: int, d_kv: int, layers: int, projection: bool, hidden: int, factory: dict) -> None:
        super().__init__()
        width = layers * 2 * d_kv
        self.embedding = nn.Embedding(p, d_kv if projection else width, **factory)
        self.transform = (
            nn.Sequential(nn.Linear(d_kv, hidden, **factory), nn.Tanh(), nn.Linear(hidden, width, **factory))
            if projection
            else None
        )

    def forward(self) -> torch.Tensor:
        """The table [P, L * 2 * kv_heads * head_dim] (the MLP applied when there is one)."""
        table = self.embedding.weight
        return self.transform(table) if self.transform is not None else table


class PrefixLayer(VirtualTokenLayer):
    """`model.peftkit_prefix`: every prefix adapter of the model, and the hooks that put the active one in."""

    method_name = "prefix"

    def __init__(self) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict()
        self.dims: dict[str, int] = {}

    def add_adapter(self, model: nn.Module, name: str, config: PrefixConfig) -> None:
        dims = model_dims(model)
        d_kv = dims["kv_heads"] * dims["head_dim"]
        weight = input_embeddings(model).weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        hidden = config.encoder_hidden_size or d_kv
        encoder = PrefixEncoder(config.num_virtual_tokens, d_kv, dims["num_layers"], config.prefix_projection, hidden, factory)
        self.dims = dims
        if config.init != "random" and weight.device.type != "meta":
            table = self._real_token_table(model, config.num_virtual_tokens) if config.init == "vocab" else None
            _init_encoder(encoder, table)
        self.encoders[name] = encoder
        self.num_virtual[name] = config.num_virtual_tokens

    @torch.no_grad()
    def _real_token_table(self, model: nn.Module, p: int) -> torch.Tensor:
        """[P, L*2*kv*hd]: the K/V the model (adapters off here) computes for P random vocabulary tokens."""
        embed = input_embeddings(model).weight
        ids = torch.randint(0, embed.shape[0], (1, p), device=embed.device)
        active, self.active_adapter = self.active_adapter, None
        training = model.training
        model.eval()
        try:
            out = model(input_ids=ids, use_cache=True)
        finally:
            model.train(training)
            self.active_adapter = active
        cache = getattr(out, "cache", None) or out.past_key_values
        layers = [torch.stack([cache.layers[i].keys[0], cache.layers[i].values[0]]) for i in range(self.dims["num_layers"])]
        kv = torch.stack(layers)  # [L, 2, kv_heads, P, head_dim]
        return kv.permute(3, 0, 1, 2, 4).reshape(p, -1)  # rows [L0.K, L0.V, L1.K, ...], as prepare() reads them

    def table(self, name: str) -> torch.Tensor:
        """Adapter `name`'s prefix as PEFT stores it: [P, L*2*kv_heads*head_dim], rows [L0.K, L0.V, L1.K, ...]."""
        return self.encoder(name)()

    def encoder(self, name: str) -> PrefixEncoder:
        """Adapter `name`'s encoder (`encoders` is a ModuleDict: its items are typed as plain modules)."""
        return cast(PrefixEncoder, self.encoders[name])

    def prepare(self, model: nn.Module, kwargs: dict, cache: Cache | None, batch: int, name: str) -> None:
        """Write the prefix K/V of every layer into the (empty, marked) cache, for a batch of `batch`."""
        if model.training and torch.is_grad_enabled() and checkpointing_enabled(model):
            raise PeftkitError(
                "prefix tuning cannot train with gradient checkpointing: transformers then runs the layers without "
                "the KV cache that holds the prefix, so it would be silently ignored; disable gradient checkpointing"
            )
        d = self.dims
        p = self.num_virtual[name]
        dtype = input_embeddings(model).weight.dtype
        table = self.table(name).to(dtype)  # [P, L*2*kv*hd]
        kv = table.view(p, d["num_layers"], 2, d["kv_heads"], d["head_dim"]).permute(1, 2, 3, 0, 4)  # [L, 2, kv, P, hd]
        assert cache is not None  # prefix tuning always gets one (`wants_cache`)
        for layer in range(d["num_layers"]):
            keys = kv[layer, 0].unsqueeze(0).expand(batch, -1, -1, -1)  # [B, kv_heads, P, head_dim]
            values = kv[layer, 1].unsqueeze(0).expand(batch, -1, -1, -1)
            cache.update(keys, values, layer)


@torch.no_grad()
def _init_encoder(encoder: PrefixEncoder, table: torch.Tensor | None) -> None:
    """Start the prefix at `table` (None: zeros). Through the MLP, its last layer starts at weight 0 and a bias of
    the table's mean row (a bias is shared by the P rows), so the MLP's output starts there and still trains."""
    # (torch types Tensor.copy_'s source as a Tensor; it takes a number too, broadcast: hence the ignores)
    if encoder.transform is None:
        encoder.embedding.weight.copy_(table if table is not None else 0)  # type: ignore[arg-type]
        return
    last = cast(nn.Linear, encoder.transform[-1])  # the MLP ends with its Linear to the table's width
    nn.init.zeros_(last.weight)
    last.bias.copy_(table.mean(0) if table is not None else 0)  # type: ignore[arg-type]


class PrefixMethod(Method):
    """Registry entry for prefix tuning (`--method prefix --num-virtual-tokens 20`)."""

    name = "prefix"
    peft_type = "PREFIX_TUNING"
    config_cls = PrefixConfig
    mergeable = False
    why_not_mergeable = (
        "prefix tuning adds learned key/value vectors to every attention layer at run time; no weight matrix "
        "absorbs them."
    )
    option_fields = {"num_virtual_tokens": "num_virtual_tokens", "init": "init"}

    def inject(self, model: nn.Module, config: PrefixConfig, adapter_name: str) -> None:
        """Add the prefix adapter to `model.peftkit_prefix` (created, with its hooks, on first use)."""
        layer = install(model, "peftkit_prefix", PrefixLayer)
        layer.add_adapter(model, adapter_name, config)

    def export(self, model: nn.Module, adapter_name: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """PEFT's PREFIX_TUNING format; a reparameterized prefix is folded into its flat table first."""
        config: PrefixConfig = adapters(model)[adapter_name].config
        layer = installed(model, "peftkit_prefix", PrefixLayer)
        d = layer.dims
        d_kv = d["kv_heads"] * d["head_dim"]
        with torch.no_grad():
            table = layer.table(adapter_name).detach().contiguous()
        config_json = peft_prompt_config(self.peft_type, config.num_virtual_tokens, d_kv, d["kv_heads"], d["num_layers"])
        hidden = config.encoder_hidden_size or d_kv
        config_json.update({"encoder_hidden_size": hidden, "prefix_projection": False, "init_weights": None})
        return config_json, {"prompt_embeddings": table}

    def load(self, model: nn.Module, config_json: dict, tensors: dict[str, torch.Tensor], adapter_name: str) -> PrefixConfig:
        """Load a PREFIX_TUNING adapter saved by peftkit or HF PEFT (its flat table, whatever prefix_projection says)."""
        d = model_dims(model)
        d_kv = d["kv_heads"] * d["head_dim"]
        expected = {"num_layers": d["num_layers"], "token_dim": d_kv, "num_attention_heads": d["kv_heads"]}
        table = check_peft_prompt_config(config_json, tensors, expected, "prefix")
        if table.shape[1] != d["num_layers"] * 2 * d_kv:
            raise PeftkitError(
                f"'prompt_embeddings' has shape {tuple(table.shape)}, but this model needs [P, {d['num_layers'] * 2 * d_kv}] "
                f"(num_layers={d['num_layers']} x 2 x kv_heads={d['kv_heads']} x head_dim={d['head_dim']})"
            )
        config = PrefixConfig(num_virtual_tokens=table.shape[0], encoder_hidden_size=config_json.get("encoder_hidden_size"))
        inject(model, config, adapter_name)
        with torch.no_grad():
            installed(model, "peftkit_prefix", PrefixLayer).encoder(adapter_name).embedding.weight.copy_(table)
        return config

    def check_setup(self, config: PrefixConfig, *, gradient_checkpointing: bool) -> None:
        """Refuse gradient checkpointing, which drops the KV cache holding the prefix (see `PrefixLayer.prepare`)."""
        if gradient_checkpointing:
            raise PeftkitError("prefix tuning cannot train with gradient checkpointing (transformers drops the KV cache "
                               "that holds the prefix); drop --gradient-checkpointing or pick another method")

    def saved_activations(self, config: PrefixConfig, shape: ModelShape, act_bytes: int, seq_len: int) -> SavedActivations:
        """Per layer: the prefix K and V (P rows of 2 kv widths, spread over a row's seq_len tokens) and, since a
        mask is passed, K and V repeated to every query head (GQA: 2 (h - kv_dim) more). Once: the boolean mask
        (B, 1, S, S + P), S + P bytes per token."""
        a, p = act_bytes, config.num_virtual_tokens
        per_layer = p * 2 * a * shape.hidden // max(seq_len, 1) + 2 * a * (shape.hidden - shape.kv_dim)
        return SavedActivations(per_layer=per_layer, once=seq_len + p)


register(PrefixMethod())
