"""How an adversarial case fails through the real command line: exit 1, one paragraph, no traceback.

`fails` runs `hfmerge.cli.app.main` and returns stderr on one line, after checking that the error
says what went wrong and how to fix it.
"""

from __future__ import annotations

import pytest

from hfmerge.cli.app import main


def one_line(text: str) -> str:
    """`text` with every run of whitespace (rich wraps long lines) as one space."""
    return " ".join(text.split())


def fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run `hfmerge ARGV`; assert exit code 1 and an error with a fix but no traceback; stderr."""
    capsys.readouterr()
    assert main(argv) == 1
    captured = capsys.readouterr()
    err = one_line(captured.err)
    assert err.startswith("error: "), err
    assert "Fix: " in err, err
    assert "Traceback" not in captured.err + captured.out
    return err
