"""How a prompt becomes text for the model: the tokenizer's chat template, or a documented plain template.

The same format is used in training, saved with the adapter (peftkit.json "prompt_format") and reused by
`generate` and `eval`, so a model is always queried the way it was trained.
"""

from __future__ import annotations

from typing import Any

# Used for tokenizers without a chat template. The response follows directly; training appends the EOS token.
PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


def default_prompt_format(tokenizer: Any) -> dict[str, str]:
    """{"chat_template": ...} when the tokenizer has one, else {"plain_template": PLAIN_TEMPLATE}."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        return {"chat_template": template}
    return {"plain_template": PLAIN_TEMPLATE}


def render_prompt(
    tokenizer: Any, messages: list[dict[str, str]] | str, prompt_format: dict[str, str] | None = None
) -> str:
    """Text of the prompt up to where the assistant's answer starts.

    messages: a list of {"role", "content"} dicts, or a plain user string. With a chat template the tokenizer's
    `apply_chat_template(..., add_generation_prompt=True)` renders it; with the plain template, the user turns are
    joined (a system turn is prepended as-is).
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    prompt_format = prompt_format or default_prompt_format(tokenizer)
    if "chat_template" in prompt_format:
        return tokenizer.apply_chat_template(
            messages, chat_template=prompt_format["chat_template"], tokenize=False, add_generation_prompt=True
        )
    parts = [m["content"] for m in messages if m["role"] in ("system", "user")]
    return prompt_format["plain_template"].format(prompt="\n\n".join(parts))


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """The user turn of an alpaca row: the instruction, then a blank line and the input when there is one.

    Training (peftkit.data) and `eval` / `generate` both build alpaca prompts with this, so they match.
    """
    return f"{instruction}\n\n{input}" if input else instruction
