"""`peftkit generate [--model M] [--adapter DIR] "prompt"`: try a model or an adapter from the shell.

The prompt is rendered the way the adapter was trained (its saved prompt format), else with the tokenizer's chat
template, else with the plain template; the answer is streamed as it is generated (greedy by default).
"""

from __future__ import annotations

from typing import Annotated

import typer

from peftkit.cli._app import app
from peftkit.cli._options import Adapter, Model


@app.command("generate")
def generate_cmd(
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    model: Model = None,
    adapter: Adapter = None,
    system: Annotated[str | None, typer.Option("--system", help="System message (chat models).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 128,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy.")] = 0.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Generate an answer to PROMPT, with an adapter if given (its recorded base model is used without --model)."""
    import torch
    from transformers import TextStreamer

    from peftkit.core.state import prompt_format as prompt_format_of
    from peftkit.data.prompting import render_prompt
    from peftkit.io.adapters import adapter_base_model, load_adapter
    from peftkit.io.models import load_model

    torch.manual_seed(seed)
    lm, tokenizer = load_model(model if model or not adapter else adapter_base_model(adapter))
    if adapter:
        load_adapter(lm, adapter)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = render_prompt(tokenizer, messages, prompt_format_of(lm))
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.inference_mode():
        lm.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=tokenizer.pad_token_id, **sampling)
