"""Media for outbound and inbound messages (issue #11): fetch, decode, sniff, convert.

Self-contained pieces; the relays use them. Policy and limits: docs/media.md.
"""

from wa_worker.media.errors import MediaError, redact_url
from wa_worker.media.fetch import fetch_to_file, is_public_address
from wa_worker.media.files import FetchedMedia, StorageError
from wa_worker.media.inline import decode_base64_to_file
from wa_worker.media.sniff import extension_for, infer_type, sniff_mimetype
from wa_worker.media.voice import duration_seconds, is_ogg_opus, to_ogg_opus

__all__ = [
    "FetchedMedia",
    "MediaError",
    "StorageError",
    "decode_base64_to_file",
    "duration_seconds",
    "extension_for",
    "fetch_to_file",
    "infer_type",
    "is_ogg_opus",
    "is_public_address",
    "redact_url",
    "sniff_mimetype",
    "to_ogg_opus",
]
