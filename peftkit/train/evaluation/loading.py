"""The one way `generate`, `chat` and `eval` load what they run: a model, an adapter on it, the prompt format.

    load_for_inference(model, adapter) -> Loaded(model, tokenizer, prompt_format)

Without `model`, an adapter's recorded base (`base_model_name_or_path`) is loaded. A QLoRA adapter (its peftkit.json
records a quantization) was trained over a quantized base, so the base is loaded quantized the same way (bits,
quant type, double quantization, compute dtype: `peftkit.io.quantize.load_options`), unless `dequantized=True` asks
for the original weights. The adapter's stored prompt format is checked when loaded (`io.prompt_format`); without
one, the tokenizer's chat template (checked the same way: a hostile or broken template of a base model was a
traceback in `generate`), else the plain template. A loaded adapter must leave the model's output usable
(finite, not the same score for every token: `io.probe`). Every refusal is one PeftkitError line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit.core.state import prompt_format
from peftkit.data.prompting import default_prompt_format
from peftkit.io.adapters import META_NAME, adapter_base_model, load_adapter
from peftkit.io.fs import read_json_object
from peftkit.io.models import EMBEDDED_HUB_ID, load_model
from peftkit.io.probe import check_adapted_output
from peftkit.io.prompt_format import check_prompt_format
from peftkit.io.quantize import load_options

if TYPE_CHECKING:
    from peftkit.io.models import CausalLM


@dataclass
class Loaded:
    """A model ready to answer: the model (its adapter loaded and active), its tokenizer, how prompts are written."""

    model: CausalLM
    tokenizer: Any
    prompt_format: dict[str, str]


def load_for_inference(model: str | None, adapter: str | None, *, dequantized: bool = False) -> Loaded:
    """Load `model` (default: the adapter's recorded base, else the embedded model) and `adapter` on it; see the
    module docstring for the quantized base and the prompt format."""
    base = model if model or not adapter else adapter_base_model(adapter)
    options = {} if dequantized or not adapter else recorded_load_options(adapter)
    lm, tokenizer = load_model(base, **options)
    if adapter:
        load_adapter(lm, adapter)
        check_adapted_output(lm, adapter)
    shown = f"the chat template of model {base or EMBEDDED_HUB_ID!r}"  # an adapter's own was checked as it loaded
    return Loaded(lm, tokenizer, prompt_format(lm) or check_prompt_format(default_prompt_format(tokenizer), shown))


def recorded_load_options(adapter: str) -> dict[str, Any]:
    """The `load_model` arguments for the base an adapter was trained over: its recorded quantization ({} for none)."""
    meta_file = Path(adapter) / META_NAME
    if not meta_file.is_file():
        return {}
    record = read_json_object(meta_file, "peftkit's adapter metadata").get("quantization")
    return {} if record is None else load_options(record, str(meta_file))
