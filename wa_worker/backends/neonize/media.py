"""Received media: rebuild the ``Message`` a handle describes (events.media_handle),
classify whatsmeow's download errors, write the bytes as a private file."""


from __future__ import annotations

import base64
import binascii
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from ...fsutil import FILE_MODE, ensure_private_dir
from ...media import extension_for
from ..base import MediaFile, MediaUnavailable
from .events import HANDLE_VERSION, MEDIA_FIELDS
from .loading import NeonizeLib

#: the fields ``download_any`` can fetch (whatsmeow ``DownloadAny``)
DOWNLOADABLE = frozenset(kind for _, kind in MEDIA_FIELDS.values())
MAX_HANDLE_CHARS = 1024 * 1024  # a handle is a few hundred bytes (plus the caption)
#: whatsmeow's download errors that no retry can cure (expired/deleted media, corrupt keys)
_PERMANENT_DOWNLOAD = (
    "status code 404",
    "status code 410",
    "invalid media hmac",
    "invalid media enc sha256",
    "invalid media sha256",
    "file length does not match",
    "no url present",
    "nothing downloadable",
    "unknown media type",
)


def message_from_handle(handle: object) -> tuple[Any, Any]:
    """(``waE2E.Message`` to download, its media sub-message); raises
    ``MediaUnavailable(permanent=True)`` when the handle cannot be one of ours."""
    if not isinstance(handle, dict):
        raise MediaUnavailable("media handle is not an object", permanent=True)
    kind, raw, version = handle.get("kind"), handle.get("proto"), handle.get("v", HANDLE_VERSION)
    if version != HANDLE_VERSION or kind not in DOWNLOADABLE:
        raise MediaUnavailable(f"unknown media handle (kind {str(kind)[:40]!r}, v {str(version)[:10]})",
                               permanent=True)
    if not isinstance(raw, str) or len(raw) > MAX_HANDLE_CHARS:
        raise MediaUnavailable("media handle has no valid 'proto'", permanent=True)
    nz = NeonizeLib.get()
    try:
        data = base64.b64decode(raw, validate=True)
        message = nz.WAMessage()
        sub = getattr(message, str(kind))
        sub.ParseFromString(data)
    except (binascii.Error, ValueError, DecodeError) as exc:
        raise MediaUnavailable(f"media handle does not decode: {exc}", permanent=True) from None
    if not sub.directPath and not sub.URL:
        raise MediaUnavailable("media handle has no location (direct path or URL)", permanent=True)
    return message, sub


def classify_download_error(text: str) -> MediaUnavailable:
    """whatsmeow's error text -> permanent (expired, corrupt) or retry later."""
    low = text.lower()
    permanent = any(marker in low for marker in _PERMANENT_DOWNLOAD)
    return MediaUnavailable(f"download failed: {text[:300]}", permanent=permanent)


def write_media(data: bytes, sub: Any, dest_dir: Path) -> MediaFile:
    """Write ``data`` to a new 0600 file in ``dest_dir`` (blocking: run in a thread)."""
    ensure_private_dir(Path(dest_dir))
    names = sub.DESCRIPTOR.fields_by_name
    mimetype = sub.mimetype or "application/octet-stream"
    fd, name = tempfile.mkstemp(prefix="wa-media-", suffix=extension_for(mimetype), dir=dest_dir)
    path = Path(name)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    seconds = int(sub.seconds) if "seconds" in names and sub.seconds else None
    return MediaFile(
        path=path,
        mimetype=mimetype,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        filename=(sub.fileName or None) if "fileName" in names else None,
        seconds=seconds,
    )
