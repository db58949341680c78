"""`peftkit generate [--model M] [--adapter DIR] "prompt"`: try a model or an adapter from the shell.

The prompt is rendered the way the adapter was trained (its saved prompt format), else with the tokenizer's chat
template, else with the plain template; the answer is streamed as it is generated (greedy by default). `peftkit
chat` is the multi-turn version (the same code: cli/_generation.py).
"""

from __future__ import annotations

from typing import Annotated

import typer

from peftkit.cli._app import app
from peftkit.cli._generation import Generator, opening
from peftkit.cli._options import Adapter, DequantizedBase, MaxNewTokens, Model, Seed, System, Temperature


@app.command("generate")
def generate_cmd(
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    model: Model = None,
    adapter: Adapter = None,
    system: System = None,
    max_new_tokens: MaxNewTokens = 128,
    temperature: Temperature = 0.0,
    seed: Seed = 0,
    dequantized_base: DequantizedBase = False,
) -> None:
    """Generate an answer to PROMPT, with an adapter if given (its recorded base model is used without --model)."""
    Generator(model, adapter, seed, dequantized_base).answer([*opening(system), {"role": "user", "content": prompt}], max_new_tokens,
                                           temperature)
