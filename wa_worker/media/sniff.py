"""What a media file is: its mimetype (from its bytes first), its WhatsApp message type, an extension.

Rules (docs/media.md):

* The bytes decide (libmagic through python-magic). A declared type (HTTP Content-Type,
  data URL) is used only when the sniff is inconclusive (``application/octet-stream``,
  empty, libmagic unavailable) or when it agrees with the sniffed family (same top-level
  type) and the sniff is a generic container (``text/plain``, ``application/zip``, OLE):
  e.g. a declared ``text/csv`` over a sniffed ``text/plain``, or a ``.docx`` type over ``zip``.
  A declared type from another family never wins: a PNG declared ``audio/mpeg`` is ``image/png``.
* Then the file name (``mimetypes``), under the same rules; then ``application/octet-stream``.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

HEAD_BYTES = 8192

INCONCLUSIVE = frozenset(("application/octet-stream", "application/x-empty", "inode/x-empty", ""))
GENERIC = frozenset(
    ("text/plain", "application/zip", "application/x-ole-storage", "application/cdfv2", "application/x-cdf")
)

# What WhatsApp shows inline; other images/videos/audio still go, as documents.
IMAGE_TYPES = frozenset(("image/jpeg", "image/png", "image/webp", "image/gif"))
VIDEO_TYPES = frozenset(("video/mp4", "video/3gpp"))
AUDIO_TYPES = frozenset(("audio/mpeg", "audio/ogg", "audio/aac", "audio/mp4", "audio/amr", "audio/x-m4a", "audio/opus"))

_EXTENSIONS = {
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "video/mp4": ".mp4",
    "video/3gpp": ".3gp",
    "audio/mpeg": ".mp3",
    "audio/ogg": ".ogg",
    "audio/opus": ".opus",
    "audio/aac": ".aac",
    "audio/mp4": ".m4a",
    "audio/x-m4a": ".m4a",
    "audio/amr": ".amr",
    "application/pdf": ".pdf",
    "text/plain": ".txt",
    "application/octet-stream": ".bin",
}


def _normalise(mime: str | None) -> str:
    return (mime or "").split(";", 1)[0].strip().lower()


def _family(mime: str) -> str:
    return mime.split("/", 1)[0]


def _magic(head: bytes) -> str:
    try:
        import magic  # python-magic (libmagic1); neonize needs it too
    except ImportError:
        return ""
    try:
        return _normalise(magic.from_buffer(head, mime=True))
    except (magic.MagicException, OSError, ValueError):  # libmagic's own failures: no sniff
        return ""


def sniff_mimetype(path: Path, declared: str | None, filename: str | None) -> str:
    """The file's mimetype (lower case, no parameters); never raises for a readable file."""
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
    sniffed = _magic(head)
    for hint in (_normalise(declared), _normalise(mimetypes.guess_type(filename)[0] if filename else None)):
        if not hint or hint in INCONCLUSIVE:
            continue
        if sniffed in INCONCLUSIVE:
            return hint
        if sniffed in GENERIC and _family(hint) == _family(sniffed):
            return hint
    return sniffed if sniffed not in INCONCLUSIVE else "application/octet-stream"


def infer_type(mimetype: str) -> str:
    """``image|video|audio|document`` for a mimetype.

    ``sticker`` is never inferred: a WebP is an image unless the sender asks for a sticker
    (and voice notes are asked for too). Types WhatsApp does not show inline (SVG, HEIC,
    WebM, WAV, ...) are documents.
    """
    mime = _normalise(mimetype)
    if mime in IMAGE_TYPES:
        return "image"
    if mime in VIDEO_TYPES:
        return "video"
    if mime in AUDIO_TYPES:
        return "audio"
    return "document"


def extension_for(mimetype: str) -> str:
    """A file extension with its dot (``.jpg``), ``.bin`` when unknown."""
    mime = _normalise(mimetype)
    return _EXTENSIONS.get(mime) or mimetypes.guess_extension(mime) or ".bin"
