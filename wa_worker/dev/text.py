"""Untrusted text made safe for one terminal line (a stranger's message may hold ANSI escapes)."""

from __future__ import annotations


def safe(text: object) -> str:
    """Neutralise control characters: ``\\x1b`` instead of an escape sequence."""
    return "".join(
        ch if ch.isprintable() or ch == " " else ("\\x%02x" % ord(ch) if ord(ch) < 256 else "\\u%04x" % ord(ch))
        for ch in str(text)
    )


def clip(text: object, limit: int = 200) -> str:
    """``text`` on one line, made :func:`safe`, at most ``limit`` characters (``…`` when cut)."""
    one_line = safe(" ".join(str(text).split()))
    return one_line if len(one_line) <= limit else one_line[: limit - 1] + "…"
