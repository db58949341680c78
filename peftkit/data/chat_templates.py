"""`--chat-template NAME|FILE`: a chat template for a base model that has none (or to replace a model's own).

The shipped templates are Jinja files in peftkit/data/templates/ (`chatml`, `llama3`, `alpaca`); any other value
is read as a Jinja file. The chosen text becomes `tokenizer.chat_template` (so `apply_chat_template` and a saved
tokenizer use it) and the run's prompt format `{"chat_template": text}`, which peftkit saves with the adapter
(peftkit.json "prompt_format") or the model folder, so `generate`, `chat` and `eval` render prompts the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError

TEMPLATES = Path(__file__).parent / "templates"


def named_templates() -> list[str]:
    """The names of the shipped templates."""
    return sorted(path.stem for path in TEMPLATES.glob("*.jinja"))


def load_chat_template(choice: str) -> str:
    """The Jinja text of a shipped template name or of a file; a syntax error is reported with its line."""
    import jinja2

    if choice in named_templates():
        path = TEMPLATES / f"{choice}.jinja"
    else:
        path = Path(choice).expanduser()
        if not path.is_file():
            raise PeftkitError(f"--chat-template {choice!r} is neither a shipped template "
                               f"({', '.join(named_templates())}) nor a Jinja file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PeftkitError(f"--chat-template: cannot read {str(path)!r} as text ({exc})") from None
    if not text.strip():
        raise PeftkitError(f"--chat-template: {str(path)!r} is empty")
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise PeftkitError(f"--chat-template: {str(path)!r} is not a valid Jinja template (line {exc.lineno}: "
                           f"{exc.message})") from None
    return text


def use_chat_template(tokenizer: Any, choice: str | None) -> dict[str, str] | None:
    """Install the chosen template on `tokenizer` and return the prompt format that uses it; None (and the
    tokenizer untouched) when no template was chosen."""
    if not choice:
        return None
    text = load_chat_template(choice)
    tokenizer.chat_template = text
    return {"chat_template": text}
