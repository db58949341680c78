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
    assert "`--rank`, `-r`" in text and re.search(r"lora, (\w+, )*qlora: `r`", text) and "`lora_r`" in text
