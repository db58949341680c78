"""Prompt tuning (Lester et al. 2021, arXiv:2104.08691): a learned soft prompt prepended to the input embeddings.

    inputs_embeds = [prompt (P x d) ; embed(input_ids) (T x d)]          trainable parameters: P * d

Only the first call of a sequence (no cache yet) gets the prompt; its keys and values then sit in the cache, and
later decoding steps are fixed up like prefix tuning's (mask + positions, see `virtual_tokens.py`). Labels get P
leading IGNORE_INDEX (-100) (as in HF PEFT, so the last prompt position learns to predict the first real token), and the P
prompt positions are cut off the returned logits, so `logits[:, i]` still belongs to the caller's token i.
Lester et al. found initialising the prompt from real token embeddings better than random: `init="sample_vocab"`
(the default) copies the embeddings of P random vocabulary tokens (PEFT's SAMPLE_VOCAB).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Cache

from peftkit.core.archs import model_dims
from peftkit.core.inject import inject
from peftkit.core.labels import IGNORE_INDEX
from peftkit.core.method import Method
from peftkit.core.method_options import NUM_VIRTUAL_TOKENS
from peftkit.core.registry import register
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

PROMPT_INITS = {"sample_vocab": "SAMPLE_VOCAB", "random": "RANDOM"}


@dataclass(frozen=True)
class PromptConfig:
    """Prompt tuning hyper-parameters. init: "sample_vocab" (embeddings of random tokens) or "random" (N(0, 1))."""

    num_virtual_tokens: int = 20
    init: str = "sample_vocab"

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_virtual_tokens", NUM_VIRTUAL_TOKENS.check(self.num_virtual_tokens, required=True))
        if self.init not in PROMPT_INITS:
            raise PeftkitError(f"unknown prompt init {self.init!r}; choose one of {', '.join(PROMPT_INITS)}")


class PromptLayer(VirtualTokenLayer):
    """`model.peftkit_prompt`: every soft prompt of the model, and the hooks that prepend the active one."""

    method_name = "prompt"

    def __init__(self) -> None:
        super().__init__()
        self.prompts = nn.ParameterDict()

    def add_adapter(self, model: nn.Module, name: str, config: PromptConfig) -> None:
        embed = input_embeddings(model).weight  # [vocab, d]
        p = config.num_virtual_tokens
        prompt = torch.empty(p, embed.shape[1], device=embed.device, dtype=embed.dtype)
        if embed.device.type != "meta":
            with torch.no_grad():
                if config.init == "sample_vocab":
                    prompt.copy_(embed[torch.randint(0, embed.shape[0], (p,), device=embed.device)])
                else:
                    nn.init.normal_(prompt)
        self.prompts[name] = nn.Parameter(prompt)
        self.num_virtual[name] = p

    def wants_cache(self, model: nn.Module, kwargs: dict) -> bool:
        """Only when the caller wants a cache back (training usually passes use_cache=False)."""
        use_cache = kwargs.get("use_cache")
        return bool(getattr(model.config, "use_cache", True) if use_cache is None else use_cache)

    def prepare(self, model: nn.Module, kwargs: dict, cache: Cache | None, batch: int, name: str) -> None:
        """Replace input_ids by [prompt ; embeddings]; pad labels with P x -100."""
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = input_embeddings(model)(kwargs["input_ids"])
        prompt = self.prompts[name].to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # [B, P, d]
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        kwargs["input_ids"] = None
        p = prompt.shape[1]
        labels = kwargs.get("labels")
        if labels is not None:
            pad = torch.full((batch, p), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
            kwargs["labels"] = torch.cat([pad, labels], dim=1)
        self._strip = p


class PromptMethod(Method):
    """Registry entry for prompt tuning (`--method prompt --num-virtual-tokens 20`)."""

    name = "prompt"
    peft_type = "PROMPT_TUNING"
    config_cls = PromptConfig
    mergeable = False
    why_not_mergeable = "prompt tuning prepends learned input embeddings at run time; no weight matrix absorbs them."
    option_fields = {"num_virtual_tokens": "num_virtual_tokens", "init": "init"}

    def inject(self, model: nn.Module, config: PromptConfig, adapter_name: str) -> None:
        """Add the soft prompt to `model.peftkit_prompt` (created, with its hooks, on first use)."""
        install(model, "peftkit_prompt", PromptLayer).add_adapter(model, adapter_name, config)

    def extra_positions(self, config: PromptConfig) -> int:
        """The soft prompt's P positions run through every decoder layer in front of each row."""
        return config.num_virtual_tokens

    def export(self, model: nn.Module, adapter_name: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """PEFT's PROMPT_TUNING format: `prompt_embeddings` [P, hidden]."""
        config: PromptConfig = adapters(model)[adapter_name].config
        d = model_dims(model)
        config_json = peft_prompt_config(self.peft_type, config.num_virtual_tokens, d["hidden"], d["heads"], d["num_layers"])
        config_json.update(
            {
                "prompt_tuning_init": PROMPT_INITS[config.init],
                "prompt_tuning_init_text": None,
                "tokenizer_name_or_path": None,
                "tokenizer_kwargs": None,
            }
        )
        prompt = installed(model, "peftkit_prompt", PromptLayer).prompts[adapter_name].detach().contiguous()
        return config_json, {"prompt_embeddings": prompt}

    def load(self, model: nn.Module, config_json: dict, tensors: dict[str, torch.Tensor], adapter_name: str) -> PromptConfig:
        """Load a PROMPT_TUNING adapter saved by peftkit or HF PEFT."""
        d = model_dims(model)
        table = check_peft_prompt_config(config_json, tensors, {"token_dim": d["hidden"]}, "prompt")
        if table.shape[1] != d["hidden"]:
            raise PeftkitError(f"'prompt_embeddings' has shape {tuple(table.shape)}; this model needs [P, {d['hidden']}]")
        init = str(config_json.get("prompt_tuning_init") or "RANDOM").lower()
        config = PromptConfig(num_virtual_tokens=table.shape[0], init=init if init in PROMPT_INITS else "random")
        inject(model, config, adapter_name)
        with torch.no_grad():
            installed(model, "peftkit_prompt", PromptLayer).prompts[adapter_name].copy_(table)
        return config


register(PromptMethod())
