"""The check every tool test makes of a user error: exit code 2, one ``error: ...`` line on stderr, no traceback."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest


def user_error_line(main: Callable[[list[str]], int], argv: Sequence[str], capsys: pytest.CaptureFixture) -> str:
    """Run a tool's ``main`` on ``argv``; it must fail as a user error. Returns the ``error: ...`` line."""
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
