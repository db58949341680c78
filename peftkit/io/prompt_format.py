"""The check of a stored prompt format: what an adapter's peftkit.json (or a model folder's) says prompts look like.

A prompt format is {"chat_template": JINJA} or {"plain_template": TEXT with `{prompt}`}. It is stored with what was
trained and read back by `generate`, `chat` and `eval`, so it is checked when written and when read, by rendering it
once on a probe conversation: a chat template in transformers' Jinja sandbox (the one `apply_chat_template` uses),
a plain template by `str.format` after checking that its only field is a bare `{prompt}` (no attribute lookups, no
format specs: `{prompt:>999999999}` would allocate a gigabyte). Whatever fails (a syntax error, the sandbox's
refusal, an exception the template raises or causes, a huge rendering) is one PeftkitError naming where the format
was stored; nothing the template does escapes as a traceback.
"""

from __future__ import annotations

import string
from typing import Any

from peftkit.errors import PeftkitError

KINDS = ("chat_template", "plain_template")
PROBE = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."},
         {"role": "user", "content": "What is 2 + 2?"}]
MAX_RENDERED = 1 << 20  # characters of the probe's rendering: a template that writes more is not a prompt format


def check_prompt_format(value: Any, where: str) -> dict[str, str]:
    """`value` as a prompt format, after rendering it once on the probe conversation; `where` names its file (for
    the one-line error: what is wrong and what would be right)."""
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in KINDS:
        raise PeftkitError(f"{where}: the prompt format should be {{\"chat_template\": ...}} or "
                           f"{{\"plain_template\": ...}}, not {_short(value)}")
    kind, text = next(iter(value.items()))
    if not isinstance(text, str) or not text.strip():
        raise PeftkitError(f"{where}: the {kind} should be non-empty text, not {_short(text)}")
    rendered = _render_chat(text, where) if kind == "chat_template" else _render_plain(text, where)
    if len(rendered) > MAX_RENDERED:
        raise PeftkitError(f"{where}: the {kind} writes {len(rendered):,} characters for a three-message "
                           "conversation; a prompt format should write the conversation, not that much")
    return {kind: text}


def _render_chat(text: str, where: str) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        result = render_jinja_template(conversations=[PROBE], chat_template=text, add_generation_prompt=True,
                                       bos_token="<s>", eos_token="</s>")
        rendered = result[0][0]  # ([one text per conversation], indices); transformers annotates it as str
    except Exception as exc:  # noqa: BLE001 - a template can raise anything; each is the same refusal
        reason = " ".join(str(exc).split())[:200]
        raise PeftkitError(f"{where}: the chat template cannot render a conversation ({type(exc).__name__}: "
                           f"{reason}); it should be a Jinja chat template as tokenizers carry") from None
    return rendered


PROMPT_FIELD = "prompt"  # the one field of a plain template: {prompt}


def _render_plain(text: str, where: str) -> str:
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(text)
                  if name is not None]
    except ValueError as exc:
        raise PeftkitError(f"{where}: the plain template is not a format string ({exc}); write braces as {{{{ }}}} "
                           "and the prompt as {prompt}") from None
    wrong = ["{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
             for name, spec, conversion in fields if name != PROMPT_FIELD or spec or conversion]
    if wrong or not fields:
        shown = f"has the field {wrong[0][:40]}" if wrong else "has no {prompt} field"
        raise PeftkitError(f"{where}: the plain template {shown}; its only field should be {{prompt}} (other braces "
                           "written as {{ }})")
    return text.format(prompt=PROBE[-1]["content"])


def _short(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."
