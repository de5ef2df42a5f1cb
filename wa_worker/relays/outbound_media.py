"""Outbound media: a queued message's ``media_url`` / ``media_base64`` → a :class:`MediaFile`
on local disk, before the journal's ``sending`` row (docs/media.md, docs/architecture.md).

Fetch or decode into the staging folder ``<STATE_DB folder>/media-tmp/`` (0700, emptied at
start), sniff the type, settle the kind, convert a voice note to OGG/Opus; every file made is
removed when :meth:`MediaStager.staged` exits, whatever happened. Refusals raise
:class:`~wa_worker.media.MediaError` (or :class:`~wa_worker.messages.ContentError`) with a
code; the worker's own disk failing raises :class:`~wa_worker.media.StorageError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from ..backends.base import MediaFile
from ..fsutil import ensure_private_dir
from ..media import (
    FetchedMedia,
    MediaError,
    StorageError,
    decode_base64_to_file,
    duration_seconds,
    extension_for,
    fetch_to_file,
    infer_type,
    sniff_mimetype,
    to_ogg_opus,
)
from ..messages import CAPTIONED_KINDS, Content, ContentError, Kind
from ..storage.db import MEMORY

log = logging.getLogger("wa_worker.outbound")

STAGING_FOLDER = "media-tmp"
VOICE_MIMETYPE = "audio/ogg; codecs=opus"
HASH_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class MediaLimits:
    """``MEDIA_MAX_BYTES``, ``MEDIA_FETCH_TIMEOUT_S``, ``MEDIA_ALLOW_PRIVATE``."""

    max_bytes: int = 64 * 1024 * 1024
    fetch_timeout_s: float = 120.0
    allow_private: bool = False

    @classmethod
    def from_settings(cls, settings: Any) -> "MediaLimits":
        return cls(settings.MEDIA_MAX_BYTES, settings.MEDIA_FETCH_TIMEOUT_S, settings.MEDIA_ALLOW_PRIVATE)


def staging_dir(state_db: Path | str) -> Path:
    """``<STATE_DB folder>/media-tmp`` (a folder of the system's temp dir for an in-memory journal)."""
    if str(state_db) == MEMORY:
        return Path(tempfile.gettempdir()) / "wa-worker-media-tmp"
    return Path(state_db).parent / STAGING_FOLDER


def clear_staging(folder: Path) -> int:
    """Make ``folder`` (0700) and remove what a previous run left in it; returns how many entries.
    Never raises: a folder that cannot be cleared is logged (media sends then fail on their own)."""
    removed = 0
    try:
        ensure_private_dir(folder)
        for entry in folder.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
    except OSError as exc:
        log.error("cannot prepare the media staging folder %s: %s", folder, exc)
    if removed:
        log.info("removed %d media file(s) left in %s by a previous run", removed, folder)
    return removed


def _digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _check_kind(kind: Kind, mimetype: str) -> None:
    """A ``type`` the sender named must fit the file (a PDF sent as an image would arrive broken)."""
    found = infer_type(mimetype)
    if kind is Kind.STICKER and mimetype != "image/webp":
        raise MediaError("media_invalid", f"a sticker must be a WebP image, and this file is {mimetype}; "
                                          "send it as an image instead")
    wanted = {Kind.IMAGE: ("image", "JPEG, PNG, WebP or GIF"), Kind.VIDEO: ("video", "MP4 or 3GPP"),
              Kind.AUDIO: ("audio", "MP3, OGG, AAC, M4A, AMR or Opus")}.get(kind)
    if wanted is not None and found != wanted[0]:
        raise MediaError("media_invalid", f"the file is {mimetype}, not {kind.value} WhatsApp shows "
                                          f"({wanted[1]}); send it as a document"
                                          + (" or as a voice note" if kind is Kind.AUDIO else ""))


class MediaStager:
    """Stages the media of outbound messages in one private folder."""

    def __init__(self, folder: Path, limits: MediaLimits) -> None:
        self.folder = folder
        self.limits = limits

    def clear(self) -> int:
        return clear_staging(self.folder)

    @contextlib.asynccontextmanager
    async def staged(self, content: Content, *, type_given: bool) -> AsyncIterator[tuple[Kind, MediaFile]]:
        """The kind to send and the file; every file made is removed on exit."""
        made: list[Path] = []
        try:
            try:
                prepared = await self._prepare(content, type_given, made)
            except OSError as exc:  # our disk (the network's errors are MediaErrors)
                if isinstance(exc, StorageError):
                    raise
                raise StorageError(exc.errno, f"cannot stage media in {self.folder}: {exc.strerror or exc}") from exc
            yield prepared
        finally:
            for path in made:
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    log.error("could not remove the staged media file %s: %s", path, exc)

    async def _prepare(self, content: Content, type_given: bool, made: list[Path]) -> tuple[Kind, MediaFile]:
        source = content.media
        if source is None:
            raise ValueError("content without media")
        limits = self.limits
        fetched: FetchedMedia
        if source.url is not None:
            fetched = await fetch_to_file(source.url, self.folder, max_bytes=limits.max_bytes,
                                          timeout_s=limits.fetch_timeout_s, allow_private=limits.allow_private)
        else:
            data = source.base64 or ""
            # decoding 64 MiB takes a fraction of a second: off the event loop
            fetched = await anyio.to_thread.run_sync(
                lambda: decode_base64_to_file(data, self.folder, max_bytes=limits.max_bytes, filename=source.filename))
        made.append(fetched.path)
        filename = source.filename or fetched.filename
        mimetype = sniff_mimetype(fetched.path, source.mimetype or fetched.content_type, filename)
        kind = content.kind if type_given and content.kind is not None else Kind(infer_type(mimetype))
        if not type_given and kind not in CAPTIONED_KINDS and content.body.strip():
            raise ContentError(f"the file is {mimetype}, sent as {kind.value}, which cannot carry a caption: "
                               "send the text as its own message")
        if type_given:
            _check_kind(kind, mimetype)
        path, size, sha256, seconds = fetched.path, fetched.size, fetched.sha256, None
        if kind is Kind.VOICE:
            voice = await to_ogg_opus(fetched.path, self.folder)
            if voice != fetched.path:
                made.append(voice)
                path = voice
                size, sha256 = await anyio.to_thread.run_sync(_digest, voice)
            mimetype = VOICE_MIMETYPE
        if kind in (Kind.VOICE, Kind.AUDIO, Kind.VIDEO):
            length = await duration_seconds(path)
            seconds = max(1, round(length)) if length is not None else None
        if kind is Kind.DOCUMENT and not filename:
            filename = "file" + extension_for(mimetype)
        return kind, MediaFile(path=path, mimetype=mimetype, size=size, sha256=sha256, filename=filename,
                               seconds=seconds)
