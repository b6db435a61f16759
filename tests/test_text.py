"""Tests for utils/text.py: the one preview of the first few of many items in a message."""

from __future__ import annotations

import pytest

from utils.text import PREVIEW_LIMIT, preview


def test_preview_lists_all_up_to_the_limit_then_counts() -> None:
    assert preview([]) == ""
    assert preview(["a", "b", "c"]) == "a, b, c"
    assert PREVIEW_LIMIT == 5
    assert preview([f"id{i}" for i in range(5)]) == "id0, id1, id2, id3, id4"
    assert preview([f"id{i}" for i in range(12)]) == "id0, id1, id2, id3, id4, ... (12 in all)"
    assert preview(range(4), limit=2) == "0, 1, ... (4 in all)"
    assert preview(iter(["x y", "z"]), limit=1, sep="; ") == "x y; ... (2 in all)"  # any iterable, once
    with pytest.raises(ValueError, match="limit must be >= 1"):
        preview(["a"], limit=0)
