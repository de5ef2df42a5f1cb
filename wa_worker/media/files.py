"""A private temporary file written chunk by chunk, counted, hashed and capped."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from wa_worker.fsutil import FILE_MODE, ensure_private_dir
from wa_worker.media.errors import MediaError


@dataclass(frozen=True)
class FetchedMedia:
    """A media file on disk (0600, in the caller's folder; the caller deletes it after the send)."""

    path: Path
    size: int
    sha256: str
    content_type: str | None  # as declared by the sender (HTTP header / data URL); not sniffed
    filename: str | None  # a bare file name (no folders), or None


class StorageError(OSError):
    """The worker could not write the media to its own disk (full, read-only, permissions).

    Not a :class:`MediaError`: the sender did nothing wrong, the send can be retried later.
    """


class CappedFile:
    """``media-*`` temp file in ``dest_dir``, mode 0600; refuses to grow past ``max_bytes``.

    Use as a context manager: leaving it with an exception (or without :meth:`finish`)
    deletes the partial file.
    """

    def __init__(self, dest_dir: Path, max_bytes: int, too_large_hint: str) -> None:
        try:
            ensure_private_dir(Path(dest_dir))
            fd, name = tempfile.mkstemp(prefix="media-", dir=dest_dir)
        except OSError as exc:
            raise StorageError(exc.errno, f"cannot create a media file in {dest_dir}: {exc.strerror}") from exc
        os.fchmod(fd, FILE_MODE)  # mkstemp's mode already; stated, not assumed
        self._fd: int | None = fd
        self.path = Path(name)
        self.size = 0
        self._max = max_bytes
        self._hint = too_large_hint
        self._hash = hashlib.sha256()
        self._done = False

    def write(self, chunk: bytes) -> None:
        if self.size + len(chunk) > self._max:
            raise MediaError(
                "media_too_large", f"the media is larger than the {self._max}-byte limit (MEDIA_MAX_BYTES); {self._hint}"
            )
        assert self._fd is not None
        view = memoryview(chunk)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as exc:
            raise StorageError(exc.errno, f"cannot write the media file {self.path}: {exc.strerror}") from exc
        self._hash.update(chunk)
        self.size += len(chunk)

    def finish(self, content_type: str | None, filename: str | None) -> FetchedMedia:
        self._close()
        self._done = True
        return FetchedMedia(self.path, self.size, self._hash.hexdigest(), content_type, filename)

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        self._close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> CappedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.discard()
