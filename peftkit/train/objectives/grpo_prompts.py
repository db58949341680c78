"""GRPO's prompt rows: `prompt` (a string, the user's turn, or a list of messages), `messages` (the turns before
the last assistant turn are the prompt; that turn is the `answer` when the data has none) or alpaca rows (instruction
/ input; the output is the `answer`). Every other column goes to the reward functions, as TRL passes them. Prompts
are rendered as exact match renders them (the chat template or the adapter's prompt format); no torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peftkit.errors import PeftkitError


@dataclass
class Prompts:
    """Prompt rows: what the reward functions get (`prompts` as given, `columns`) and what the model gets
    (`prompt_ids`); `lengths` (prompt tokens, for batching) and `references` (messages, answer) for exact match."""

    prompts: list[Any]
    prompt_ids: list[list[int]]
    columns: dict[str, list[Any]]
    references: list[tuple[list[dict], str]] = field(default_factory=list)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.prompt_ids]

    def __len__(self) -> int:
        return len(self.prompt_ids)


def prompt_rows(rows: Any, tokenizer: Any, prompt_format: dict, max_length: int | None, completion: int,
                what: str) -> Prompts:
    """The rows' prompts (rendered as exact match renders them) and other columns; a prompt that leaves less than
    `completion` tokens of `max_length` (the context) is refused."""
    limit = max_length - completion if max_length else None
    from peftkit.data.prompting import render_prompt

    names = list(rows.column_names)
    if not {"prompt", "messages", "instruction"} & set(names):
        raise PeftkitError(f"--objective grpo needs prompt rows: a `prompt` column (text or messages), `messages` or "
                           f"alpaca rows; the {what} data has the columns {names}")
    extra = [n for n in names if n not in ("prompt", "messages")]
    prompts: list[Any] = []
    columns: dict[str, list[Any]] = {n: [] for n in extra}
    references = []
    for i, row in enumerate(rows):
        prompt, answer = _prompt_of(row, i)
        prompts.append(prompt)
        for name in extra:
            columns[name].append(row[name])
        if answer is not None and "answer" not in names:
            columns.setdefault("answer", []).append(answer)
        answer = row.get("answer", answer)
        if answer is not None and not isinstance(prompt, str):
            references.append((prompt, str(answer)))
    texts = [render_prompt(tokenizer, p, prompt_format) for p in prompts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    longest = max(range(len(ids)), key=lambda i: len(ids[i]), default=None)
    if limit is not None and longest is not None and len(ids[longest]) > limit:
        raise PeftkitError(f"the {what} prompt of row {longest} has {len(ids[longest])} tokens, and with "
                           f"--max-completion-length {completion} more it exceeds --max-length {max_length}; "
                           f"raise --max-length or shorten the prompt")
    return Prompts(prompts, ids, columns, references)


def one_shot(rows: Any, shot: dict[str, Any]) -> Any:
    """The bundled task's GRPO rows: each alpaca row becomes a `prompt` of three turns, the worked example `shot`
    (a training row: its user turn and its answer as the assistant's) then the row's own user turn, and its
    `answer`. An untrained 135M Instruct model never writes the `name=...; city=...; date=...` line from the
    instruction alone, so sampling would find no reward to learn from; one example of the line gets it started
    (docs/training.md, "GRPO on the bundled task")."""
    from peftkit.data.prompting import alpaca_prompt

    example = [{"role": "user", "content": alpaca_prompt(shot["instruction"], shot.get("input"))},
               {"role": "assistant", "content": shot["output"]}]

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        user = {"role": "user", "content": alpaca_prompt(row["instruction"], row.get("input"))}
        return {"prompt": [*example, user], "answer": row["output"]}

    return rows.map(convert, remove_columns=rows.column_names)


def _prompt_of(row: dict[str, Any], index: int) -> tuple[Any, str | None]:
    """(the prompt as given: text or messages, the answer a messages / alpaca row carries or None)."""
    if "prompt" in row and row["prompt"] is not None:
        return row["prompt"], None
    if "messages" in row:
        messages = list(row["messages"])
        if messages and messages[-1].get("role") == "assistant":
            return messages[:-1], messages[-1]["content"]
        return messages, None
    from peftkit.train.evaluation.heldout import row_to_chat

    return row_to_chat(row, "alpaca", index)
