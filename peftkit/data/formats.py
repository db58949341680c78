"""The row formats we train on, detected from the column names, and their conversion to conversations.

- **alpaca**: `instruction`, optional `input`, `output`. The user turn is `alpaca_prompt(instruction, input)`
  (instruction, blank line, input); the assistant turn is `output`.
- **messages**: a list of `{"role", "content"}` dicts in a `messages` or `conversations` column (ShareGPT's
  `{"from": "human"|"gpt", "value"}` is accepted too). Every assistant turn is a training target.
- **text**: a `text` column; every token is a target (continued pre-training style).
- **prompt_completion** (TRL's prompt-completion rows), two kinds told apart per row like TRL does:
  standard, `prompt` and `completion` strings: the text `prompt + completion` with no template, the completion and
  an EOS as targets (`Completion`); conversational, `prompt` and `completion` lists of messages: the conversation
  `prompt + completion`, where only the completion's assistant turns are targets (the prompt's are marked
  `"train": False`, which a messages row may also use to leave an assistant turn untrained).

`to_example` validates one row and returns a list of messages, a `Completion`, or, for text, the string.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from peftkit.data.prompting import alpaca_prompt
from peftkit.errors import PeftkitError

FORMATS = ("alpaca", "messages", "text", "prompt_completion")
MESSAGE_COLUMNS = ("messages", "conversations")
# ShareGPT role names -> chat-template role names
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant"}



@dataclass(frozen=True)
class Completion:
    """A standard prompt-completion row: plain text, the completion (and EOS) trained, the prompt not."""

    prompt: str
    completion: str


Example = list[dict[str, Any]] | str | Completion


def detect_format(column_names: Iterable[str]) -> str:
    """"messages" if a messages/conversations column exists, else "alpaca" (instruction + output), else
    "prompt_completion" (prompt + completion), else "text"."""
    columns = list(column_names)
    if any(name in columns for name in MESSAGE_COLUMNS):
        return "messages"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if "text" in columns:
        return "text"
    raise PeftkitError(
        f"cannot tell the data format from the columns {columns}; expected alpaca (instruction, input, output), "
        "messages (a 'messages' or 'conversations' list of {role, content}), prompt_completion (prompt, completion) "
        "or text (a 'text' column); map other names with --columns, e.g. instruction=question,output=answer"
    )


def check_format(fmt: str, column_names: Iterable[str]) -> str:
    """Resolve "auto" and make sure an explicitly requested format has its columns."""
    columns = list(column_names)
    if fmt == "auto":
        return detect_format(columns)
    if fmt not in FORMATS:
        raise PeftkitError(f"unknown data format {fmt!r}; use auto, {', '.join(FORMATS)}")
    needed = {"alpaca": ["instruction", "output"], "text": ["text"],
              "prompt_completion": ["prompt", "completion"]}.get(fmt, [])
    missing = [name for name in needed if name not in columns]
    if fmt == "messages" and not any(name in columns for name in MESSAGE_COLUMNS):
        missing = ["messages or conversations"]
    if missing:
        raise PeftkitError(f"format {fmt!r} needs the column(s) {missing}, but the data has {columns}")
    return fmt


def to_example(row: dict[str, Any], fmt: str, index: int) -> Example:
    """One row as messages (alpaca, messages, conversational prompt_completion), a Completion (standard
    prompt_completion) or a string (text). index is 0-based; errors say "row index+1"."""
    where = f"row {index + 1}"
    if fmt == "text":
        return _string(row.get("text"), where, "text")
    if fmt == "prompt_completion":
        return _prompt_completion(row.get("prompt"), row.get("completion"), where)
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


def _prompt_completion(prompt: Any, completion: Any, where: str) -> Example:
    if isinstance(prompt, list) or isinstance(completion, list):
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise PeftkitError(f"{where}: 'prompt' and 'completion' must both be text or both be lists of "
                               f"{{role, content}}, got {type(prompt).__name__} and {type(completion).__name__}")
        prompt_turns = [{**m, "train": False} if m["role"] == "assistant" else m
                        for m in parse_messages(prompt, where, "prompt", need_answer=False)]
        return prompt_turns + parse_messages(completion, where, "completion")
    return Completion(_string(prompt, where, "prompt"), _string(completion, where, "completion"))


def parse_messages(turns: Any, where: str, field: str = "messages", need_answer: bool = True) -> list[dict[str, Any]]:
    """A list of {role, content} (or ShareGPT {from, value}) turns as chat-template messages (an assistant turn
    may carry `"train": false`); errors name `where` and the column `field`.
    need_answer: refuse a conversation without a trained assistant turn (there would be nothing to learn)."""
    if not isinstance(turns, list) or not turns:
        raise PeftkitError(f"{where}: {field!r} must be a non-empty list of {{role, content}}, got {turns!r:.60}")
    messages = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise PeftkitError(f"{where}: message {number} must be a {{role, content}} object, got {turn!r:.60}")
        role = turn.get("role") if turn.get("role") is not None else turn.get("from")
        content = turn.get("content") if turn.get("content") is not None else turn.get("value")
        if not isinstance(role, str) or not isinstance(content, str):
            raise PeftkitError(f"{where}: message {number} needs text 'role' and 'content', got {turn!r:.80}")
        message: dict[str, str | bool] = {"role": _ROLE_ALIASES.get(role, role), "content": content}
        if turn.get("train") is False:
            message["train"] = False
        messages.append(message)
    if need_answer and not any(trained(m) for m in messages):
        raise PeftkitError(f"{where}: the {'completion' if field == 'completion' else 'conversation'} has no "
                           "assistant turn to train on, so there is nothing to learn")
    return messages


def trained(message: dict[str, Any]) -> bool:
    """Whether a message is a training target: an assistant turn not marked `"train": False`."""
    return message["role"] == "assistant" and message.get("train") is not False
