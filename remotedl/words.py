"""Small helpers for the words remotedl prints."""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """``plural(1, "file")`` is "1 file", ``plural(2, "file")`` "2 files" (and 0 files);
    ``many`` for a plural that is not ``word + "s"``."""
    return f"{n} {word if n == 1 else (many or word + 's')}"
