"""The one error type of the media pieces, and URL redaction for its messages."""

from __future__ import annotations

from typing import Literal

from yarl import URL

MediaErrorCode = Literal[
    "media_too_large",
    "media_fetch_failed",
    "media_refused",
    "media_invalid",
    "media_conversion_failed",
]
CODES: frozenset[str] = frozenset(
    ("media_too_large", "media_fetch_failed", "media_refused", "media_invalid", "media_conversion_failed")
)


class MediaError(Exception):
    """A media refusal or failure: a machine-readable ``code`` and a message saying what to fix.

    Messages never carry URL credentials or query values (see :func:`redact_url`).
    """

    def __init__(self, code: MediaErrorCode, message: str) -> None:
        if code not in CODES:
            raise ValueError(f"unknown media error code {code!r}")
        super().__init__(f"{code}: {message}")
        self.code: MediaErrorCode = code
        self.message = message


def redact_url(url: str | URL) -> str:
    """``url`` safe for an error message: userinfo, query values and fragment replaced.

    ``https://user:pw@host/p?token=abc&x=1#f`` -> ``https://***@host/p?token=***&x=***``.
    Anything unparsable becomes ``<invalid URL>``.
    """
    try:
        u = url if isinstance(url, URL) else URL(str(url))
        out = u.with_fragment(None)
        if u.raw_user is not None or u.raw_password is not None:
            out = out.with_user(None)
        text = str(out.with_query(None))
    except (ValueError, TypeError):
        return "<invalid URL>"
    if u.raw_user is not None or u.raw_password is not None:
        scheme, sep, rest = text.partition("://")
        text = f"{scheme}{sep}***@{rest}" if sep else text
    if u.raw_query_string:
        keys = [part.split("=", 1)[0] for part in u.raw_query_string.split("&") if part]
        text += "?" + "&".join(f"{k}=***" for k in keys)
    return text
