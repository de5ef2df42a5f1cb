"""Untrusted text made safe for one terminal line (a stranger's message may hold ANSI escapes)."""

from __future__ import annotations

from typing import Any


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


def describe(m: dict[str, Any]) -> str:
    """A stored message (outbound or inbound, as the dev API lists it) as one line of text:
    its body for text, else ``[type details] caption`` (issue #11's kinds)."""
    kind = m.get("type") or "text"
    body = str(m.get("body") or "")
    if kind == "text":
        return body if not m.get("reply_to") and not m.get("quoted_id") else \
            f"[reply to {m.get('reply_to') or m.get('quoted_id')}] {body}"
    parts = [kind]
    media = _sub(m, "media")
    filename = m.get("filename") or media.get("filename")
    if filename:
        parts.append(str(filename))
    if kind == "reaction":
        reaction = m.get("reaction")
        emoji, target = ((reaction.get("emoji"), reaction.get("target_id")) if isinstance(reaction, dict)
                         else (reaction, m.get("reply_to")))
        parts.append(f"{emoji} on {target}" if emoji else f"removed on {target}")
    elif kind in ("edit", "revoke"):
        parts.append(str(m.get("target_id")))
    elif kind == "call":
        call = _sub(m, "call")
        video = call.get("video", m.get("video"))
        rejected = call.get("rejected", m.get("rejected"))
        parts += ["video" if video else "voice", "rejected" if rejected else "not rejected"]
    elif kind == "location":
        parts += [str(x) for x in (m.get("name"), m.get("latitude"), m.get("longitude")) if x is not None]
    elif kind == "contact":
        contact = _sub(m, "contact")
        parts += [str(x) for x in (contact.get("name"), contact.get("phone")) if x]
    if m.get("media_error"):
        parts.append(f"media not kept: {m['media_error']}")
    quoted = m.get("quoted_id") or (m.get("reply_to") if kind != "reaction" else None)
    if quoted:
        parts.append(f"reply to {quoted}")
    return "[" + " ".join(parts) + "]" + (f" {body}" if body else "")


def _sub(m: dict[str, Any], key: str) -> dict[str, Any]:
    value = m.get(key)
    return value if isinstance(value, dict) else {}
