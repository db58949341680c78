"""Try it: an adapter's answer and its base model's answer to the same prompt, streamed token by token.

One model is loaded per adapter (the CLI's `Generator`, as `peftkit chat` loads it); the base model's answer is the
same model with its adapter switched off (`core.ops.disable_adapters`), so no second copy of the weights is held.
Generation runs in a worker thread feeding transformers' `TextIteratorStreamer`; the page reads the pieces as
server-sent events. Loaded models are kept (a few) so a conversation does not reload them for every message.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

KEEP = 2  # adapters kept loaded


class Chats:
    """Loaded generators by adapter folder (least recently used dropped first)."""

    def __init__(self) -> None:
        self._loaded: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def generator(self, adapter: str) -> tuple[Any, threading.Lock]:
        """(the CLI's Generator for `adapter`, the lock its generations take: base and adapter answers share one
        model, whose adapter is switched off for the base's)."""
        from peftkit.cli._generation import Generator

        with self._lock:
            if adapter not in self._loaded:
                self._loaded[adapter] = (Generator(None, adapter, seed=0), threading.Lock())
                while len(self._loaded) > KEEP:
                    self._loaded.popitem(last=False)
            self._loaded.move_to_end(adapter)
            return self._loaded[adapter]

    def stream(self, adapter: str, prompt: str, side: str, max_new_tokens: int = 64) -> Iterator[str]:
        """The pieces of the greedy answer to `prompt` with the adapter (side "adapter") or without it ("base")."""
        import torch
        from transformers import TextIteratorStreamer

        from peftkit.core.ops import disable_adapters

        gen, lock = self.generator(adapter)
        inputs = gen.encode([{"role": "user", "content": prompt}]).to(gen.lm.device)
        streamer = TextIteratorStreamer(gen.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode(), lock:
                    if side == "base":
                        with disable_adapters(gen.lm):
                            _generate(gen, inputs, streamer, max_new_tokens)
                    else:
                        _generate(gen, inputs, streamer, max_new_tokens)
            except BaseException as exc:  # noqa: BLE001 - shown on the page as one line; the stream must end
                failure.append(exc)
                streamer.end()

        threading.Thread(target=run, daemon=True).start()
        yield from streamer
        if failure:
            raise failure[0]


def _generate(gen: Any, inputs: Any, streamer: Any, max_new_tokens: int) -> None:
    gen.lm.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer, do_sample=False,
                    pad_token_id=gen.tokenizer.pad_token_id)
