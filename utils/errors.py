"""User errors: one clear message and a non-zero exit, never a traceback (tracebacks are for bugs).

A tool's ``main`` runs its work through :func:`exit_on_user_error`. Exceptions that describe a problem with what the
user gave (a config key, a file, a folder) are printed as one ``error: ...`` line on stderr and the process exits
with :data:`EXIT_USER_ERROR`; anything else propagates with its traceback. ``MSFC_DEBUG=1`` re-raises user errors too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

DEBUG_ENV = "MSFC_DEBUG"
EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input (config, files, folders, another run in the way); the message names it."""


class InputError(UserError, ValueError):
    """A value or file the user gave that is not what was expected; the message names it and says what was expected.

    Also a ``ValueError``, so code (and tests) that catch one keep working.
    """


class BadFileError(UserError, OSError):
    """A file that exists but cannot be read as what it should be (corrupt, truncated, another format); the message
    names it. Also an ``OSError``, like the reader errors it replaces."""


# Errors whose message already names the offending path: a user's mistake, not a bug.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


def exit_on_user_error(main: Callable[[], int]) -> int:
    """Run ``main()``; a user error becomes one ``error: <message>`` line on stderr and exit code 2.

    Args:
        main: the tool's work; returns its exit code.

    Returns:
        ``main()``'s exit code, or :data:`EXIT_USER_ERROR`.
    """
    try:
        return main()
    except USER_ERRORS as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"{prefix}error: {err}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
