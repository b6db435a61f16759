"""Short texts for messages: the one way an error or a log line lists the first few of many items."""

from __future__ import annotations

from collections.abc import Iterable

# How many items a message lists before summarising the rest as a count.
PREVIEW_LIMIT = 5


def preview(items: Iterable[object], limit: int = PREVIEW_LIMIT, sep: str = ", ") -> str:
    """The first ``limit`` items joined by ``sep``, then ``..., (N in all)`` when there are more.

    Args:
        items: anything printable (ids, keys, paths); each is shown with ``str``.
        limit: how many to show (>= 1).
        sep: what stands between two items.

    Returns:
        ``"a, b, c"`` for three items, ``"a, b, c, d, e, ... (12 in all)"`` for twelve with the default limit;
        ``""`` for none.
    """
    if limit < 1:
        raise ValueError(f"preview: limit must be >= 1, got {limit}")
    shown = [str(item) for item in items]
    if len(shown) <= limit:
        return sep.join(shown)
    return f"{sep.join(shown[:limit])}{sep}... ({len(shown)} in all)"
