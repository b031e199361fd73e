"""Text read from files and folders, made safe to show: a crafted class name, model name or file name
must not move the cursor, recolour or rewrite the terminal, and a huge value must not flood a message."""
from __future__ import annotations

import unicodedata
from typing import Any

# Control (Cc) and format (Cf) characters: ANSI escapes, carriage returns, bidirectional overrides,
# zero-width characters; line and paragraph separators (Zl, Zp); code points without a glyph (Cs, Co, Cn).
_UNPRINTABLE = {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"}


def printable(text: str) -> str:
    """`text` with every control or format character written as an escape (`\\x1b`, `\\u202e`)."""
    if text.isprintable():
        return text
    return "".join(
        ascii(ch)[1:-1] if unicodedata.category(ch) in _UNPRINTABLE and ch != " " else ch for ch in text
    )


def short_repr(value: Any, limit: int = 60) -> str:
    """`repr(value)`, cut to about `limit` characters (a value from a file may be huge)."""
    if isinstance(value, (list, dict)) and len(value) > limit:
        return f"<a {type(value).__name__} of {len(value)} items>"
    try:
        text = repr(value)
    except RecursionError:
        return f"<a deeply nested {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
