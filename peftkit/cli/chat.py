"""`peftkit chat [--model M] [--adapter DIR] [--system TEXT]`: a multi-turn conversation on stdin / stdout.

Each answer is streamed as it is generated; the conversation so far is the prompt of the next answer, rendered
like `generate`'s (the adapter's saved prompt format, else the chat template, else the plain template). `/reset`
starts over (the --system message stays), `/exit` or end of input (Ctrl-D) ends the chat, Ctrl-C during an answer
stops that answer. When the conversation outgrows the model's context, its oldest exchanges are dropped.
"""

from __future__ import annotations

import contextlib
import sys

from peftkit.cli._app import app
from peftkit.cli._generation import Generator, Message, opening
from peftkit.cli._options import Adapter, DequantizedBase, MaxNewTokens, Model, Seed, System, Temperature

PROMPT = ">>> "
HELP = "/reset clears the conversation, /exit or Ctrl-D ends the chat"


@app.command("chat")
def chat_cmd(
    model: Model = None,
    adapter: Adapter = None,
    system: System = None,
    max_new_tokens: MaxNewTokens = 256,
    temperature: Temperature = 0.0,
    seed: Seed = 0,
    dequantized_base: DequantizedBase = False,
) -> None:
    """Chat with a model or an adapter (its recorded base model is used without --model); /reset, /exit."""
    generator = Generator(model, adapter, seed, dequantized_base)
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    print(f"chat ({HELP})")
    turns: list[Message] = []  # user and assistant messages, alternating
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            print()
            return
        command = line.strip()
        if command == "/exit":
            return
        if command == "/reset":
            turns.clear()
            print("(conversation cleared)")
            continue
        if not command:
            continue
        turns.append({"role": "user", "content": line})
        dropped = _fit(generator, opening(system), turns, max_new_tokens)
        if dropped:
            print(f"(the {dropped} oldest exchange(s) dropped to fit the model's context of {generator.context} tokens)")
        try:
            reply = generator.answer([*opening(system), *turns], max_new_tokens, temperature)
        except KeyboardInterrupt:
            print("\n(answer interrupted)")
            turns.pop()
            continue
        turns.append({"role": "assistant", "content": reply})


def _fit(generator: Generator, start: list[Message], turns: list[Message], max_new_tokens: int) -> int:
    """Drop the oldest exchanges (user + answer) until the prompt and the answer fit the model's context; the
    number dropped. The newest user message always stays (a too long one fails in generation, saying so)."""
    dropped = 0
    while (generator.context and len(turns) > 1
           and generator.encode([*start, *turns])["input_ids"].shape[1] + max_new_tokens > generator.context):
        del turns[:2]
        dropped += 1
    return dropped
