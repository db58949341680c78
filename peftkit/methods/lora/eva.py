"""EVA, Explained Variance Adaptation (Paischer et al. 2024, arXiv:2410.07170): `--init eva`, A from the data.

Each adapted layer's A starts as the top right-singular vectors of that layer's inputs on the training data, so the
adapter starts in the directions the inputs vary most; B starts at zero (the model starts as its base). As HF PEFT
0.21 does it (`initialize_lora_eva_weights`), step by step:

1. The inputs of every adapted layer (the base model's, adapters off) on the target tokens (attention mask and
   labels != -100) of one micro-batch; layers that see the same input (q / k / v, gate / up) share one SVD.
2. Each shared input gets an incremental PCA (`ipca.py`) of k = round(r * rho) components, fed one micro-batch at
   a time, cycling through the data; a layer has converged when the cosine similarity of each of its first
   (currently assigned rank) components to the previous step's is >= tau; converged layers stop reading.
3. After every step the rank budget (the sum of the configured ranks) is redistributed: the budget's largest
   explained-variance ratios over all layers' components, each layer getting as many ranks as it has among them
   (rho = 1: no redistribution; a layer may get 0 and is then not adapted).
4. A = the first (assigned rank) components; alpha scales with the rank (alpha * new / r, PEFT's
   adjust_scaling_factors), so every module keeps the configured scaling; ranks and alphas that differ from r and
   lora_alpha become rank_pattern / alpha_pattern entries keyed by the module's full path, as PEFT writes them.

The saved adapter is a plain LoRA (the patterns in adapter_config.json); it needs no data to load.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.inject import base_modules, replace_module
from peftkit.core.labels import IGNORE_INDEX
from peftkit.core.ops import disable_adapters
from peftkit.core.state import set_adapter_config
from peftkit.errors import PeftkitError
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.ipca import IncrementalPca
from peftkit.methods.lora.layer import LoraLayer

log = logging.getLogger(__name__)
MAX_BATCHES = 1000  # micro-batches EVA reads at most before giving up (PEFT's loop has no bound)
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


@dataclass
class _Input:
    """One distinct layer input: its PCA, which components have converged, and whether it still reads batches."""

    pca: IncrementalPca
    converged: torch.Tensor
    reading: bool = True


def initialise_eva(model: nn.Module, config: LoraConfig, adapter_name: str,
                   batches: Callable[[], Iterator[dict[str, torch.Tensor]]]) -> None:
    """Set adapter `adapter_name`'s A (and ranks) from the layer inputs of `batches()` (see the module docstring)."""
    layers = [(p, m) for p, m in base_modules(model) if isinstance(m, LoraLayer) and adapter_name in m.lora_A]
    ranks = {p: config.rank_alpha(p)[0] for p, _ in layers}
    k = {p: round(r * config.eva_rho) for p, r in ranks.items()}
    for path, layer in layers:
        if k[path] > layer.in_features:
            raise PeftkitError(f"eva: round(r * eva_rho) = {k[path]} components exceed the {layer.in_features} "
                               f"inputs of {path}; lower --rank or eva_rho")
    was_training = model.training
    model.eval()
    try:
        with disable_adapters(model), torch.no_grad():
            owner = _shared_inputs(model, dict(layers), next(batches()))
            for path in k:
                k[path] = max(k[q] for q in k if owner[q] == owner[path])
            components = _fit(model, dict(layers), owner, k, sum(ranks.values()), config.eva_tau, batches())
    finally:
        model.train(was_training)
    _apply(model, config, adapter_name, layers, components)


def _hooked(model: nn.Module, layers: dict[str, LoraLayer], batch: dict[str, torch.Tensor],
            read: Callable[[str, torch.Tensor], None]) -> None:
    """One forward of `batch` calling read(path, rows) with each layer's inputs at the batch's target tokens."""
    mask = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(batch["input_ids"], dtype=torch.bool)
    if "labels" in batch:
        mask = mask & (batch["labels"] != IGNORE_INDEX)
    where = mask.nonzero().T.unbind()
    handles = [layer.register_forward_hook(lambda _m, args, _out, path=path: read(path, args[0][where]))
               for path, layer in layers.items()]
    try:
        model(**{key: batch[key] for key in MODEL_INPUTS if key in batch})
    finally:
        for handle in handles:
            handle.remove()


def _shared_inputs(model: nn.Module, layers: dict[str, LoraLayer], batch: dict[str, torch.Tensor]) -> dict[str, str]:
    """{path: the first path (in model order) whose input on `batch` is identical}: owners map to themselves."""
    seen: dict[str, torch.Tensor] = {}
    _hooked(model, layers, batch, lambda path, rows: seen.__setitem__(path, rows))
    owner: dict[str, str] = {}
    for path, rows in seen.items():
        owner[path] = next((o for o in dict.fromkeys(owner.values()) if torch.equal(seen[o], rows)), path)
    return owner


def _fit(model: nn.Module, layers: dict[str, LoraLayer], owner: dict[str, str], k: dict[str, int], budget: int,
         tau: float, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{path: its first (assigned rank) components}, once every input's assigned components have converged."""
    inputs = {o: _Input(IncrementalPca(k[o]), torch.zeros(k[o], dtype=torch.bool)) for o in dict.fromkeys(owner.values())}

    def read(path: str, rows: torch.Tensor) -> None:
        state = inputs.get(path)
        if state is None or not state.reading or rows.shape[0] < state.pca.k:
            return  # a follower (its owner reads), converged, or too few tokens for k components
        before = state.pca.components
        state.pca.partial_fit(rows.float())
        if before is not None:
            assert state.pca.components is not None
            state.converged = (F.cosine_similarity(state.pca.components, before) >= tau).cpu()

    ranks = dict(k)
    for step, batch in enumerate(batches):
        for o, state in inputs.items():
            state.reading = not bool(state.converged[: ranks[o]].all())
        if not any(state.reading for state in inputs.values()):
            return {p: inputs[o].pca.components[: ranks[p]] for p, o in owner.items()}  # type: ignore[index]
        if step == MAX_BATCHES:
            raise PeftkitError(f"eva: the layer inputs' components did not converge within {MAX_BATCHES} "
                               "micro-batches; lower eva_tau (now {tau}) or give more data")
        _hooked(model, layers, batch, read)
        if all(state.pca.components is not None for state in inputs.values()):
            ranks = _redistribute(inputs, owner, k, budget)
    raise PeftkitError("eva: the training data gave no micro-batch")


def _redistribute(inputs: dict[str, _Input], owner: dict[str, str], k: dict[str, int], budget: int) -> dict[str, int]:
    """Ranks per path: the `budget` largest explained-variance ratios over every layer's components (a layer that
    shares its input counts its owner's), counted per layer; within a shared input the owner gets the largest count
    (PEFT's order: owners in model order, then the followers)."""
    order = list(inputs) + [p for p in owner if owner[p] != p]
    keys, values = [], []
    for path in order:
        ratios = inputs[owner[path]].pca.explained_variance_ratio
        assert ratios is not None  # called once every input has components
        keys += [path] * len(ratios[: k[owner[path]]])
        values += list(ratios[: k[owner[path]]])
    top = torch.stack(values).argsort(descending=True)[:budget]
    counts = Counter(keys[int(i)] for i in top)
    ranks = {p: counts.get(p, 0) for p in order}
    for path in order[len(inputs):]:
        first = owner[path]
        if ranks[first] < ranks[path]:
            ranks[first], ranks[path] = ranks[path], ranks[first]
    return ranks


def _apply(model: nn.Module, config: LoraConfig, name: str, layers: list[tuple[str, LoraLayer]],
           components: dict[str, torch.Tensor]) -> None:
    """A = components (the adapter rebuilt at its new rank where that changed, removed where it is 0), B = 0, and
    the adapter's config recorded with the new rank / alpha patterns."""
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    kept = []
    for path, layer in layers:
        r, alpha = config.rank_alpha(path)
        u = components[path]
        if u.shape[0] == 0:
            layer.delete_adapter(name)
            if not layer.adapter_names():
                replace_module(model, path, layer.base_layer)
            continue
        if u.shape[0] != r:
            alpha *= u.shape[0] / r
            _rebuild(layer, name, config, u.shape[0], alpha)
        with torch.no_grad():
            layer.factor_a(name).weight.copy_(u)
            layer.factor_b(name).weight.zero_()
        kept.append(path)
        if u.shape[0] != config.r:
            rank_pattern[path] = u.shape[0]
        if alpha != config.alpha:
            alpha_pattern[path] = alpha
    targets = config.target_modules if len(kept) == len(layers) else "^(" + "|".join(map(re.escape, kept)) + ")$"
    set_adapter_config(model, name, replace(config, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                                            target_modules=targets))
    log.info("eva: ranks %d..%d over %d modules (budget %d)%s", min(rank_pattern.values(), default=config.r),
             max(rank_pattern.values(), default=config.r), len(kept), sum(config.rank_alpha(p)[0] for p, _ in layers),
             f", {len(layers) - len(kept)} modules left unadapted (rank 0)" if len(kept) < len(layers) else "")


def _rebuild(layer: LoraLayer, name: str, config: LoraConfig, rank: int, alpha: float) -> None:
    """Adapter `name` of `layer` made again at `rank`, its parameters in the old ones' dtype and trainability."""
    old = layer.factor_a(name).weight
    layer.add_adapter(name, rank, alpha, config.lora_dropout, config.use_rslora, "default", config.lora_bias,
                      config.use_dora)
    for param in layer.adapter_parameters(name):
        param.data = param.data.to(old.dtype)
        param.requires_grad_(old.requires_grad)
    layer.dora_norms.clear(name)
