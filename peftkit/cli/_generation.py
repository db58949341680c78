"""What `generate` and `chat` share: load a model (and an adapter), render a conversation the way the model was
trained, stream an answer.

A conversation is rendered with the adapter's saved prompt format, else the tokenizer's chat template, else the
plain template. A chat template renders the whole history itself; with the plain template every earlier exchange
is written as in training (`template(user turns) + answer + EOS`), then the template of the pending user turns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from peftkit.errors import PeftkitError

if TYPE_CHECKING:  # `peftkit --help` imports this module: no torch or transformers at run time
    from transformers import BatchEncoding

    from peftkit.io.models import CausalLM

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}


class Generator:
    """A model (with its adapter, if any) and its tokenizer, ready to answer conversations."""

    def __init__(self, model: str | None, adapter: str | None, seed: int, dequantized: bool = False) -> None:
        import torch

        from peftkit.train.evaluation.loading import load_for_inference

        torch.manual_seed(seed)
        loaded = load_for_inference(model, adapter, dequantized=dequantized)  # eval's loading too
        self.lm: CausalLM = loaded.model
        self.tokenizer = loaded.tokenizer
        self.prompt_format: dict[str, str] = loaded.prompt_format
        self.context = getattr(self.lm.config, "max_position_embeddings", None)  # None: no known limit

    def prompt_text(self, messages: list[Message]) -> str:
        """The conversation as text, up to where the next answer starts (see the module docstring)."""
        from peftkit.data.prompting import render_prompt

        if "chat_template" in self.prompt_format:
            return render_prompt(self.tokenizer, messages, self.prompt_format)
        text = ""
        pending: list[Message] = []
        for message in messages:
            if message["role"] == "assistant":
                text += render_prompt(self.tokenizer, pending, self.prompt_format) + message["content"]
                text += self.tokenizer.eos_token or ""
                pending = []
            else:
                pending.append(message)
        return text + render_prompt(self.tokenizer, pending, self.prompt_format)

    def encode(self, messages: list[Message]) -> BatchEncoding:
        """Token ids (and attention mask) of `prompt_text(messages)`; a plain prompt starts with the tokenizer's
        special prefix (BOS) as in training, a chat template writes its own."""
        from peftkit.data.rendering import uses_special_prefix

        special = uses_special_prefix(messages, self.prompt_format)
        return self.tokenizer(self.prompt_text(messages), return_tensors="pt", add_special_tokens=special)

    def answer(self, messages: list[Message], max_new_tokens: int, temperature: float) -> str:
        """Stream the model's answer to `messages` to stdout as it is generated; return it (special tokens left
        out). Greedy at temperature 0."""
        import torch
        from transformers import TextStreamer

        inputs = self.encode(messages).to(self.lm.device)
        max_new_tokens = self.room(inputs["input_ids"].shape[1], max_new_tokens)
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with torch.inference_mode():
            out = self.lm.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                                   pad_token_id=self.tokenizer.pad_token_id, **sampling)
        new = out[0, inputs["input_ids"].shape[1]:]
        return cast(str, self.tokenizer.decode(new, skip_special_tokens=True)).strip()  # one sequence: one str


    def room(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """How many tokens may follow a prompt of `prompt_tokens`: at most `max_new_tokens`, and no more than the
        model's context leaves (past its positions a model produces garbage; 10**12 asked for ran for ever). A
        prompt that fills the context is refused in one line."""
        if not self.context:
            return max_new_tokens
        if prompt_tokens >= self.context:
            raise PeftkitError(f"the prompt is {prompt_tokens:,} tokens, and the model's context holds "
                               f"{self.context:,}; shorten it")
        return min(max_new_tokens, self.context - prompt_tokens)


def opening(system: str | None) -> list[Message]:
    """The messages a conversation starts with: the system message, when given."""
    return [{"role": "system", "content": system}] if system else []
