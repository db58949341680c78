"""Shared machinery of the forward-time methods (prefix tuning, prompt tuning): hooks, cache, mask, positions.

Both methods put `P` extra key/value entries in front of the real tokens of every attention layer:

- prefix tuning (Li & Liang 2021) writes learned K/V straight into a transformers `Cache` before the first forward;
- prompt tuning (Lester et al. 2021) prepends `P` learned input embeddings, so the model itself caches their K/V.

Either way the caller (the user, the trainer, `generate()`) only knows about the real tokens, so a forward
pre-hook (with kwargs) on the CausalLM fixes the call up, never patching transformers' code:

    attention mask   [B, T_seen]      -> [B, P + T_seen]       (ones for the virtual tokens)
    position_ids     real positions   -> + P                    (real tokens start at P, as in HF PEFT)
    cache            None / empty     -> a DynamicCache marked with P (prefix: pre-filled with the prefix K/V)

The cache is marked, so later decoding steps (same cache object, as `generate()` passes it back) get the same fix.
The hook state lives in a `VirtualTokenLayer`, an AdapterLayer submodule of the model (`model.peftkit_prefix`,
`model.peftkit_prompt`), so its parameters are model parameters and set_adapter / disable_adapters /
delete_adapter work generically; `unload()` removes the hooks.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
from torch import nn
from transformers import Cache, DynamicCache, PretrainedConfig

from peftkit.core.method import AdapterLayer
from peftkit.errors import PeftkitError

if TYPE_CHECKING:  # a runtime import of PreTrainedModel loads transformers' modeling code (~2.5 s)
    from transformers import PreTrainedModel

LayerT = TypeVar("LayerT", bound="VirtualTokenLayer")

_MARK = "_peftkit_virtual_tokens"  # attribute set on a Cache whose first P entries are virtual tokens


def virtual_tokens_in(cache: Any) -> int:
    """How many virtual tokens a peftkit-marked cache starts with (0 for any other cache or None)."""
    return getattr(cache, _MARK, 0) if cache is not None else 0


class VirtualTokenLayer(AdapterLayer):
    """Base of the hook-holding AdapterLayers: one per model, holding every adapter of one forward-time method.

    Subclasses keep adapters in ModuleDict / ParameterDict children, record `num_virtual[name]`, and implement
    `prepare(model, kwargs, batch, name)` for a first (prefill) call, where the cache holds nothing yet.
    """

    method_name = "virtual-token"

    def __init__(self) -> None:
        super().__init__()
        self.num_virtual: dict[str, int] = {}
        self._handles: list[Any] = []
        self._strip = 0  # virtual positions to cut off the logits of the current call (prompt tuning)
        self._full = 0  # the logits length (P + T) at which they are cut; any other length (logits_to_keep) is not

    def attach(self, model: nn.Module) -> None:
        """Register the (removable) hooks on the CausalLM `model`."""
        if not self._handles:
            self._handles = [
                model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
                model.register_forward_hook(self._post_hook, with_kwargs=True),
            ]

    def unload(self, names: list[str]) -> nn.Module | None:
        """Remove the hooks; this layer is deleted from the model (virtual tokens cannot be merged into weights)."""
        if names:
            raise PeftkitError(f"{type(self).__name__} cannot be merged into base weights")
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return None

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.num_virtual.pop(name, None)

    def prepare(self, model: nn.Module, kwargs: dict, cache: Cache | None, batch: int, name: str) -> None:
        """Put adapter `name`'s virtual tokens into a first call's kwargs (cache, inputs_embeds, labels).

        A subclass that prepends P positions to the inputs sets `self._strip = P` (they are cut off the logits).
        """
        raise NotImplementedError

    def wants_cache(self, model: nn.Module, kwargs: dict) -> bool:
        """Whether a first call without a cache gets a new (marked) one; prefix tuning always needs it."""
        return True

    def _pre_hook(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        name = self.active_adapter
        self._strip = 0
        if name is None:
            return args, kwargs
        kwargs = _as_kwargs(model, args, kwargs)
        key = _cache_key(model, kwargs)
        cache = kwargs.get(key)
        tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if tokens is None:
            return (), kwargs
        batch, q_len = tokens.shape[0], tokens.shape[1]
        p = self.num_virtual[name]
        _refuse_packed(kwargs, self.method_name)
        if cache is None or cache.get_seq_length() == 0:  # first call: put the virtual tokens in
            if cache is None and self.wants_cache(model, kwargs):
                cache = DynamicCache(config=_config(model))
            if cache is not None:
                setattr(cache, _MARK, p)
                kwargs[key] = cache
            self.prepare(model, kwargs, cache, batch, name)
        elif virtual_tokens_in(cache) != p:
            return (), kwargs  # a cache peftkit did not make: it already holds whatever the caller put in it
        total = (cache.get_seq_length() if cache is not None else 0) + q_len + (p if self._strip else 0)
        self._full = q_len + self._strip
        _extend_mask(kwargs, p, total)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = _shift_positions(kwargs["position_ids"], p, self._strip)
        return (), kwargs

    def _post_hook(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Cut the prompt's positions off the logits so they line up with the caller's tokens again."""
        p, full, self._strip = self._strip, self._full, 0
        logits = getattr(output, "logits", None)
        if p and logits is not None and logits.shape[1] == full:
            output.logits = logits[:, p:]
        return output


def _as_kwargs(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Move positional arguments of `model.forward` into kwargs (model(input_ids) -> {"input_ids": ...})."""
    if not args:
        return dict(kwargs)
    names = [n for n, p in inspect.signature(model.forward).parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    return {**dict(zip(names, args, strict=False)), **kwargs}


def _refuse_packed(kwargs: dict, method: str) -> None:
    """Packed rows (positions restarting inside a row, no mask) would share one copy of the virtual tokens."""
    pos = kwargs.get("position_ids")
    if pos is None or kwargs.get("attention_mask") is not None or pos.shape[-1] < 2:
        return
    if (pos.diff(dim=-1) != 1).any():
        raise PeftkitError(
            f"{method} tuning cannot run on packed sequences (position_ids restart inside a row): each example needs "
            "its own virtual tokens; train with packing off"
        )


def _cache_key(model: nn.Module, kwargs: dict) -> str:
    """The forward's cache argument: `cache` on transformers >= 5.2x, `past_key_values` before."""
    params = inspect.signature(model.forward).parameters
    key = "cache" if "cache" in params else "past_key_values"
    if key == "cache" and kwargs.get("past_key_values") is not None:
        kwargs["cache"] = kwargs.pop("past_key_values")  # the deprecated spelling
    if kwargs.get(key) is not None and not isinstance(kwargs[key], Cache):
        raise PeftkitError("prefix / prompt tuning needs a transformers Cache object, not legacy past_key_values tuples")
    return key


def _extend_mask(kwargs: dict, p: int, total: int) -> None:
    """Prepend P 'attend' columns to a mask that covers only the real tokens (a complete one is left alone)."""
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.shape[-1] != total - p:
        return
    if mask.dim() == 2:
        ones = torch.ones(mask.shape[0], p, dtype=mask.dtype, device=mask.device)
    elif mask.dim() == 4:  # [B, 1, q, kv]: bool (True = attend) or additive float (0 = attend)
        fill = True if mask.dtype == torch.bool else 0
        ones = torch.full((*mask.shape[:-1], p), fill, dtype=mask.dtype, device=mask.device)
    else:
        return
    kwargs["attention_mask"] = torch.cat([ones, mask], dim=-1)


def _config(model: nn.Module) -> PretrainedConfig:
    """The config of the CausalLM `model` (the hooks see it as an nn.Module, whose attributes are typed
    `Tensor | Module`)."""
    return cast(PretrainedConfig, model.config)


def input_embeddings(model: nn.Module) -> nn.Embedding:
    """The CausalLM's input embedding layer (`get_input_embeddings()`: an nn.Embedding or a subclass, which
    transformers types as any nn.Module), for the layers that only see the model as an nn.Module."""
    return cast(nn.Embedding, cast("PreTrainedModel", model).get_input_embeddings())


def _shift_positions(position_ids: torch.Tensor, p: int, prepended: int) -> torch.Tensor:
    """Real tokens take positions from P on; prepended prompt embeddings (prompt tuning) take 0..P-1."""
    shifted = position_ids + p
    if not prepended:
        return shifted
    virtual = torch.arange(p, device=position_ids.device, dtype=position_ids.dtype)
    virtual = virtual.expand(*position_ids.shape[:-1], p)
    return torch.cat([virtual, shifted], dim=-1)


def install(model: nn.Module, attr: str, layer_cls: type[LayerT]) -> LayerT:
    """The model's `attr` layer (e.g. `model.peftkit_prefix`), created and hooked on first use."""
    if "cache" not in inspect.signature(model.forward).parameters and "past_key_values" not in inspect.signature(
        model.forward
    ).parameters:
        raise PeftkitError(f"model_type {_config(model).model_type!r}: its forward takes no KV cache, so virtual tokens cannot be added")
    layer = getattr(model, attr, None)
    if layer is None:
        layer = layer_cls()
        setattr(model, attr, layer)
    layer.attach(model)
    return layer


def installed(model: nn.Module, attr: str, layer_cls: type[LayerT]) -> LayerT:
    """The model's `attr` layer that `install` put there (an AttributeError when there is none)."""
    layer = getattr(model, attr)
    if not isinstance(layer, layer_cls):
        raise PeftkitError(f"model.{attr} is a {type(layer).__name__}, not a {layer_cls.__name__}")
    return layer


def peft_prompt_config(peft_type: str, num_virtual_tokens: int, token_dim: int, heads: int, layers: int) -> dict:
    """The adapter_config.json fields HF PEFT 0.21 writes for every prompt-learning method (causal LM)."""
    return {
        "peft_type": peft_type,
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": num_virtual_tokens,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": heads,
        "num_layers": layers,
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
    }


def check_peft_prompt_config(config_json: dict, tensors: dict, expected: dict[str, int], what: str) -> torch.Tensor:
    """Check a saved prompt-learning adapter against this model; return its `prompt_embeddings` [P, width].

    expected: the config fields this model needs (num_layers, token_dim, num_attention_heads).
    """
    if config_json.get("task_type") not in (None, "CAUSAL_LM"):
        raise PeftkitError(f"the {what} adapter is for task_type {config_json['task_type']!r}; peftkit loads CAUSAL_LM")
    if (config_json.get("num_transformer_submodules") or 1) != 1:
        raise PeftkitError(f"the {what} adapter is for an encoder-decoder model (num_transformer_submodules=2)")
    for key, value in expected.items():
        if config_json.get(key) is not None and config_json[key] != value:
            raise PeftkitError(f"the {what} adapter has {key}={config_json[key]} but this model needs {value}; it does not fit")
    if set(tensors) != {"prompt_embeddings"}:
        raise PeftkitError(f"a {what} adapter holds exactly one tensor 'prompt_embeddings'; this one has {sorted(tensors)}")
    table = tensors["prompt_embeddings"]
    p = config_json.get("num_virtual_tokens")
    if table.dim() != 2 or (p is not None and table.shape[0] != p):
        raise PeftkitError(f"'prompt_embeddings' has shape {tuple(table.shape)}, expected [num_virtual_tokens={p}, width]")
    return table
