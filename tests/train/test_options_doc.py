"""docs/options.md is generated from the options' declarations; the committed file must be the generated one."""

from __future__ import annotations

import re
from pathlib import Path

from peftkit.train.config import train_options
from peftkit.train.options.doc import options_markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "options.md"


def test_committed_options_table_is_current():
    generated = options_markdown()
    assert DOC.read_text() == generated, "docs/options.md is out of date: run python scripts/make_options_doc.py"


def test_table_lists_every_option_with_its_flags_and_aliases():
    text = options_markdown()
    for name, option in train_options().items():
        assert f"| `{name}` |" in text, name
        assert all(f"`{alias}`" in text for alias in option.aliases), name
    rank_row = next(line for line in text.splitlines() if line.startswith("| `rank`"))
    assert "`--rank`, `-r`" in rank_row and "`lora_r`" in rank_row
    assert re.search(r"\| (\w+, )*lora, (\w+, )*qlora(, \w+)*: `r` \|", rank_row), rank_row  # lora, oft, qlora, vera: `r`
