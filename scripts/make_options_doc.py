"""Write docs/options.md from the options' declarations (peftkit/train/options/doc.py).

    python scripts/make_options_doc.py          # rewrite docs/options.md
    python scripts/make_options_doc.py --check  # exit 1 when the committed file is out of date

Run it after adding or changing an option; tests/train/test_options_doc.py fails until the file is current.
"""

from __future__ import annotations

import sys
from pathlib import Path

from peftkit.train.options.doc import options_markdown

DOC = Path(__file__).resolve().parent.parent / "docs" / "options.md"


def main(argv: list[str]) -> int:
    """Write (or with --check, compare) docs/options.md; the exit status."""
    text = options_markdown()
    if "--check" in argv:
        current = DOC.read_text() if DOC.is_file() else ""
        print("docs/options.md is current" if current == text else "docs/options.md is out of date")
        return 0 if current == text else 1
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
