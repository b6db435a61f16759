"""User errors: one clear message and a non-zero exit, never a traceback (tracebacks are for bugs).

A tool's ``main`` runs its work through :func:`exit_on_user_error`. Exceptions that describe a problem with what the
user gave (a config key, a file, a folder) are printed as one ``error: ...`` line on stderr and the process exits
with :data:`EXIT_USER_ERROR`; anything else propagates with its traceback. ``MSFC_DEBUG=1`` re-raises user errors too.

``MSFC_DEBUG=1`` also turns on the checks of the training hot path that must read tensor values on the host (a device
synchronisation each on CUDA): e.g. that the online labels given to a loss or to the memory bank lie in range. They
hold by construction in training, so by default they are skipped (:func:`debug_enabled`).
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


def debug_enabled() -> bool:
    """True when ``MSFC_DEBUG`` is set to anything but empty or ``0`` (read at each call, so tests can set it)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


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
        if debug_enabled():
            raise
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"{prefix}error: {err}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
