"""The three row formats we train on, detected from the column names, and their conversion to conversations.

- **alpaca**: `instruction`, optional `input`, `output`. The user turn is `alpaca_prompt(instruction, input)`
  (instruction, blank line, input); the assistant turn is `output`.
- **messages**: a list of `{"role", "content"}` dicts in a `messages` or `conversations` column (ShareGPT's
  `{"from": "human"|"gpt", "value"}` is accepted too). Every assistant turn is a training target.
- **text**: a `text` column; every token is a target (continued pre-training style).

`to_example` validates one row and returns either a list of messages or, for text, the string.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from peftkit.data.prompting import alpaca_prompt
from peftkit.errors import PeftkitError

FORMATS = ("alpaca", "messages", "text")
MESSAGE_COLUMNS = ("messages", "conversations")
# ShareGPT role names -> chat-template role names
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant"}

Example = list[dict[str, str]] | str


def detect_format(column_names: Iterable[str]) -> str:
    """"messages" if a messages/conversations column exists, else "alpaca" (instruction + output), else "text"."""
    columns = list(column_names)
    if any(name in columns for name in MESSAGE_COLUMNS):
        return "messages"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    if "text" in columns:
        return "text"
    raise PeftkitError(
        f"cannot tell the data format from the columns {columns}; expected alpaca (instruction, input, output), "
        "messages (a 'messages' or 'conversations' list of {role, content}) or text (a 'text' column)"
    )


def check_format(fmt: str, column_names: Iterable[str]) -> str:
    """Resolve "auto" and make sure an explicitly requested format has its columns."""
    columns = list(column_names)
    if fmt == "auto":
        return detect_format(columns)
    if fmt not in FORMATS:
        raise PeftkitError(f"unknown data format {fmt!r}; use auto, {', '.join(FORMATS)}")
    needed = {"alpaca": ["instruction", "output"], "text": ["text"]}.get(fmt, [])
    missing = [name for name in needed if name not in columns]
    if fmt == "messages" and not any(name in columns for name in MESSAGE_COLUMNS):
        missing = ["messages or conversations"]
    if missing:
        raise PeftkitError(f"format {fmt!r} needs the column(s) {missing}, but the data has {columns}")
    return fmt


def to_example(row: dict[str, Any], fmt: str, index: int) -> Example:
    """One row as messages (alpaca, messages) or a string (text). index is 0-based; errors say "row index+1"."""
    where = f"row {index + 1}"
    if fmt == "text":
        return _string(row.get("text"), where, "text")
    if fmt == "alpaca":
        instruction = _string(row.get("instruction"), where, "instruction")
        output = _string(row.get("output"), where, "output")
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise PeftkitError(f"{where}: 'input' must be text, got {type(extra).__name__}")
        return [{"role": "user", "content": alpaca_prompt(instruction, extra)},
                {"role": "assistant", "content": output}]
    turns = next((row[name] for name in MESSAGE_COLUMNS if row.get(name) is not None), None)
    return parse_messages(turns, where)


def _string(value: Any, where: str, field: str) -> str:
    """The field as text; numbers (a CSV column of answers is read as ints) become their decimal text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if value is None:
        raise PeftkitError(f"{where}: the field {field!r} is missing")
    if not isinstance(value, str):
        raise PeftkitError(f"{where}: the field {field!r} must be text, got {type(value).__name__}")
    return value


def parse_messages(turns: Any, where: str, need_answer: bool = True) -> list[dict[str, str]]:
    """A list of {role, content} (or ShareGPT {from, value}) turns as chat-template messages; errors name `where`.
    need_answer: refuse a conversation without an assistant turn (there would be nothing to learn)."""
    if not isinstance(turns, list) or not turns:
        raise PeftkitError(f"{where}: 'messages' must be a non-empty list of {{role, content}}, got {turns!r:.60}")
    messages = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise PeftkitError(f"{where}: message {number} must be a {{role, content}} object, got {turn!r:.60}")
        role = turn.get("role") if turn.get("role") is not None else turn.get("from")
        content = turn.get("content") if turn.get("content") is not None else turn.get("value")
        if not isinstance(role, str) or not isinstance(content, str):
            raise PeftkitError(f"{where}: message {number} needs text 'role' and 'content', got {turn!r:.80}")
        messages.append({"role": _ROLE_ALIASES.get(role, role), "content": content})
    if need_answer and not any(m["role"] == "assistant" for m in messages):
        raise PeftkitError(f"{where}: the conversation has no assistant turn, so there is nothing to learn")
    return messages
