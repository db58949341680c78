"""The CLI's refusal contract, checked in-process: exit code 2, exactly one `error:` line, no traceback."""

from __future__ import annotations

import pytest

from peftkit.cli import main


def cli_error_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run `peftkit ARGV` in this process; it must refuse as the CLI promises. Returns the `error:` line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert exc.value.code == 2 and "Traceback" not in err and len(errors) == 1, err
    return errors[0]
