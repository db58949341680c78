"""peftkit: parameter-efficient fine-tuning for Hugging Face causal LMs, without a wrapper class.

    import peftkit
    model, tokenizer = peftkit.load_model()                  # embedded SmolLM2-135M-Instruct
    peftkit.inject(model, peftkit.LoraConfig(r=8))           # in place; the model stays a plain HF model
    ...train...
    peftkit.save_adapter(model, "out/adapter")               # HF PEFT format
    peftkit.merge(model)                                     # fold into the weights, remove the adapter modules

This module only re-exports the public API; docs/architecture.md maps the packages behind it.
"""

from peftkit._version import __version__
from peftkit.core.counting import trainable_parameters
from peftkit.core.inject import inject
from peftkit.core.ops import delete_adapter, disable_adapters, merge, merge_adapter, set_adapter, unmerge_adapter
from peftkit.errors import PeftkitError
from peftkit.io.adapters import load_adapter, save_adapter
from peftkit.io.models import load_model
from peftkit.methods.bottleneck import AdapterConfig
from peftkit.methods.lora import LoraConfig
from peftkit.methods.prefix import PrefixConfig
from peftkit.methods.prompt import PromptConfig

__all__ = [
    "__version__",
    "PeftkitError",
    "LoraConfig",
    "AdapterConfig",
    "PrefixConfig",
    "PromptConfig",
    "inject",
    "load_adapter",
    "save_adapter",
    "merge",
    "merge_adapter",
    "unmerge_adapter",
    "set_adapter",
    "disable_adapters",
    "delete_adapter",
    "trainable_parameters",
    "load_model",
]
