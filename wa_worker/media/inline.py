"""``media_base64`` to a private temp file: plain base64 or a ``data:<mime>;base64,`` URL.

The size is checked from the text's length before anything is decoded, then the text is
decoded slice by slice straight into the file (never a second full copy in memory).
Standard and URL-safe alphabets are accepted, whitespace (line breaks) is ignored and
missing ``=`` padding is tolerated; anything else is ``media_invalid``.
"""

from __future__ import annotations

import binascii
from pathlib import Path

from wa_worker.media.errors import MediaError
from wa_worker.media.files import CappedFile, FetchedMedia

SLICE = 256 * 1024  # characters decoded per step (a multiple of 4)
_WHITESPACE = (" ", "\n", "\r", "\t")
_URLSAFE = str.maketrans("-_", "+/", " \n\r\t\v\f")


def _split_data_url(data: str) -> tuple[str, str | None]:
    """(base64 payload, declared mimetype or None)."""
    if not data[:5].lower() == "data:":
        return data, None
    header, sep, payload = data.partition(",")
    if not sep:
        raise MediaError("media_invalid", "media_base64 is a data URL without a ',' before the data")
    params = [p.strip() for p in header[5:].split(";")]
    if "base64" not in (p.lower() for p in params[1:]):
        raise MediaError("media_invalid", "media_base64 data URLs must be base64-encoded (data:<type>;base64,...)")
    mime = params[0].lower() or None
    return payload, mime


def estimated_size(payload: str) -> int:
    """Decoded size of ``payload`` (exact for valid base64), from its length alone."""
    chars = len(payload) - sum(payload.count(c) for c in _WHITESPACE)
    tail = payload[-16:].rstrip()
    padding = len(tail) - len(tail.rstrip("="))
    return max(0, chars * 3 // 4 - min(padding, 2))


def decode_base64_to_file(
    data: str | bytes, dest_dir: Path, *, max_bytes: int, filename: str | None = None
) -> FetchedMedia:
    """Decode ``data`` into a new 0600 file in ``dest_dir``; raise :class:`MediaError` otherwise."""
    if isinstance(data, bytes):
        try:
            data = data.decode("ascii")
        except UnicodeDecodeError:
            raise MediaError("media_invalid", "media_base64 must be ASCII base64 text") from None
    payload, content_type = _split_data_url(data)
    size = estimated_size(payload)
    if size > max_bytes:
        raise MediaError(
            "media_too_large",
            f"media_base64 decodes to about {size} bytes, over the {max_bytes}-byte limit (MEDIA_MAX_BYTES); "
            "send a smaller file or a media_url",
        )
    with CappedFile(dest_dir, max_bytes, "send a smaller file") as out:
        carry = ""
        padded = False  # a decoded group ended in '=': nothing may follow
        for start in range(0, len(payload), SLICE):
            text = carry + payload[start : start + SLICE].translate(_URLSAFE)
            cut = len(text) - len(text) % 4
            carry = text[cut:]
            if cut:
                if padded:
                    raise MediaError("media_invalid", _MISPLACED)
                out.write(_decode(text[:cut]))
                padded = text[cut - 1] == "="
        if carry:
            data_left = carry.rstrip("=")
            if padded or not data_left:
                raise MediaError("media_invalid", _MISPLACED)
            out.write(_decode(data_left + "=" * (-len(data_left) % 4)))
        if out.size == 0:
            raise MediaError("media_invalid", "media_base64 is empty")
        return out.finish(content_type, filename)


_MISPLACED = "media_base64 is not valid base64 (misplaced '=' padding)"


def _decode(chunk: str) -> bytes:
    try:
        return binascii.a2b_base64(chunk, strict_mode=True)
    except (binascii.Error, ValueError):
        raise MediaError(
            "media_invalid", "media_base64 is not valid base64 (check the encoding: only A-Z a-z 0-9 + / =)"
        ) from None
