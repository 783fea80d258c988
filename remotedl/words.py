"""Small helpers for the words remotedl prints."""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """``plural(1, "file")`` is "1 file", ``plural(2, "file")`` "2 files" (and 0 files);
    ``many`` for a plural that is not ``word + "s"``."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


_CONTROL = {i: f"\\x{i:02x}" for i in [*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F]}
_CONTROL.update({i: f"\\x{i:02x}" for i in range(0x80, 0xA0)})  # C1 controls (CSI as one char)


def printable(text: str, *, newlines: bool = True) -> str:
    """Text from a box made safe for a terminal: control characters (escape sequences that
    could retitle the window, move the cursor or hide text) shown escaped, never sent raw.
    Newlines and tabs stay unless ``newlines`` is False."""
    out = text.translate(_CONTROL)
    if not newlines:
        out = out.replace("\n", "\\n").replace("\t", "\\t")
    return out
