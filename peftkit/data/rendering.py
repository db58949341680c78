"""Turn one example into segments of text marked target / not target, the way the model will be prompted.

A *segment* is `(piece, is_target)` where piece is text, or an int token id (the EOS appended by the plain
template). Tokenizing the segments (tokenizing.py) gives `input_ids` and `labels`.

With a chat template, the conversation is rendered once in full; then, for every assistant turn i, the template is
rendered for `messages[:i]` with the generation prompt (where the answer starts) and for `messages[:i+1]` (where it
ends). The text between is the target: the answer AND the template's end-of-turn marker (`<|im_end|>` for
SmolLM2 / Qwen), so the model learns to stop. Whitespace the template writes after the marker stays masked.
This needs a template whose renderings of a prefix of the conversation are prefixes of the full rendering; the
common ones (ChatML, Llama 3, Mistral, Gemma, Phi) are. One that is not (e.g. one that drops earlier "thinking")
raises an error rather than mask the wrong tokens.

Without a chat template, each assistant turn becomes `PLAIN_TEMPLATE.format(prompt=<the system/user turns since
the previous answer, joined by blank lines>) + answer + EOS`, with the answer and EOS as targets, which is what
`peftkit.data.prompting.render_prompt` produces for a single-turn prompt at generation time.
"""

from __future__ import annotations

from typing import Any

from peftkit.data.formats import Completion, Example, trained
from peftkit.errors import PeftkitError

Segment = tuple[str | int, bool]


def render_segments(
    example: Example, tokenizer: Any, prompt_format: dict[str, str], train_on_prompt: bool = False
) -> list[Segment]:
    """Segments of one example (see the module docstring). train_on_prompt marks every segment as a target."""
    if isinstance(example, str):
        segments: list[Segment] = [(example, True), (_eos_id(tokenizer), True)]
    elif isinstance(example, Completion):  # TRL's standard prompt-completion: plain text, no template
        segments = [(example.prompt, False), (example.completion, True), (_eos_id(tokenizer), True)]
    elif "chat_template" in prompt_format:
        segments = _chat_segments(example, tokenizer, prompt_format["chat_template"])
    else:
        segments = _plain_segments(example, tokenizer, prompt_format["plain_template"])
    if train_on_prompt:
        segments = [(piece, True) for piece, _ in segments]
    return [(piece, target) for piece, target in segments if piece != ""]


def uses_special_prefix(example: Example, prompt_format: dict[str, str]) -> bool:
    """Whether the tokenizer's own special tokens (BOS) go in front: yes for plain text, no for chat templates
    (a chat template writes its own BOS, and `apply_chat_template(tokenize=True)` adds none either)."""
    return isinstance(example, (str, Completion)) or "chat_template" not in prompt_format


def _chat_segments(messages: list[dict[str, Any]], tokenizer: Any, template: str) -> list[Segment]:
    def render(turns: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            turns, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )

    full = render(messages, False)
    segments: list[Segment] = []
    done = 0  # characters of `full` already assigned to a segment
    for i, message in enumerate(messages):
        if not trained(message):  # untrained assistant turns stay in the masked text between targets
            continue
        through = render(messages[: i + 1], False)
        end = len(through.rstrip())
        if i:
            prompt = render(messages[:i], True)
            start = len(prompt) if through.startswith(prompt) else -1
        else:  # an opening assistant turn: the template may still write a default system turn before it
            start = through.rfind(message["content"]) if message["content"] else -1
        if not full.startswith(through) or start < done or start > end:
            raise PeftkitError(
                "the chat template renders a conversation differently from its beginning, so the answer tokens "
                "cannot be located; pass a prompt_format with another chat_template, or use the plain template"
            )
        segments += [(full[done:start], False), (full[start:end], True)]
        done = end
    segments.append((full[done:], False))
    return segments


def _plain_segments(messages: list[dict[str, Any]], tokenizer: Any, template: str) -> list[Segment]:
    segments: list[Segment] = []
    pending: list[str] = []  # system / user contents since the previous answer
    for message in messages:
        if message["role"] != "assistant":
            pending.append(message["content"])
            continue
        target = trained(message)
        segments += [(template.format(prompt="\n\n".join(pending)), False), (message["content"], target),
                     (_eos_id(tokenizer), target)]
        pending = []
    return segments


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise PeftkitError("the tokenizer has no EOS token, so the model could not learn where an answer ends")
    return int(tokenizer.eos_token_id)
