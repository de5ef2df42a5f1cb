"""The dev state folder (default ``./.wa-worker/``) and its secret.

Layout (folder 0700, files 0600)::

    .wa-worker/
        secret              the shared WORKER_SECRET (generated on first run)
        proxy.db            the reference proxy's SQLite
        proxy-url           the running proxy's URL (for the CLI helpers)
        worker-url          the running worker's URL (for ``inbound`` and ``scan``)
        auth/               AUTH_DIR: one folder per linked instance
        state/wa-worker.db  STATE_DB: the worker's journal
"""

from __future__ import annotations

import fcntl
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..fsutil import FILE_MODE, ensure_private_dir, write_private

DEFAULT_DIR = Path(".wa-worker")
SECRET_ENV = "WORKER_SECRET"
MIN_SECRET_LEN = 8


class DevStateError(Exception):
    """A one-line problem with the state folder or the secret."""


@dataclass(frozen=True, slots=True)
class DevPaths:
    root: Path

    @property
    def secret_file(self) -> Path:
        return self.root / "secret"

    @property
    def proxy_db(self) -> Path:
        return self.root / "proxy.db"

    @property
    def proxy_url_file(self) -> Path:
        return self.root / "proxy-url"

    @property
    def worker_url_file(self) -> Path:
        return self.root / "worker-url"

    @property
    def lock_file(self) -> Path:
        return self.root / "lock"

    @property
    def auth_dir(self) -> Path:
        return self.root / "auth"

    @property
    def state_db(self) -> Path:
        return self.root / "state" / "wa-worker.db"

    def prepare(self) -> "DevPaths":
        """Create the folder tree with private permissions."""
        ensure_private_dir(self.root)
        ensure_private_dir(self.auth_dir)
        ensure_private_dir(self.state_db.parent)
        return self


def find_state_dir(given: Path, start: Path | None = None) -> Path:
    """The helpers' state folder: ``given`` unless it is the default, which is looked
    for in the current directory and then each parent (the first with a ``secret``),
    so the helpers work from anywhere inside the project."""
    if given != DEFAULT_DIR:
        return given
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / DEFAULT_DIR / "secret").is_file():
            return folder / DEFAULT_DIR
    return given


def read_secret_file(paths: DevPaths) -> str | None:
    try:
        value = paths.secret_file.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DevStateError(f"cannot read {paths.secret_file}: {exc.strerror}") from None
    return value or None


def resolve_secret(paths: DevPaths, explicit: str | None = None, *, create: bool = False) -> str:
    """The secret to use: ``--secret``, else ``$WORKER_SECRET``, else the state folder's file.

    With ``create`` a missing file is generated (first run of ``wa-worker dev``).
    """
    for value, origin in ((explicit, "--secret"), (os.environ.get(SECRET_ENV), SECRET_ENV)):
        if value:
            if len(value) < MIN_SECRET_LEN:
                raise DevStateError(f"{origin} must be at least {MIN_SECRET_LEN} characters")
            return value
    existing = read_secret_file(paths)
    if existing:
        if paths.secret_file.stat().st_mode & 0o077:
            os.chmod(paths.secret_file, FILE_MODE)
        return existing
    if not create:
        raise DevStateError(
            f"no secret: {paths.secret_file} does not exist (start `wa-worker dev` first, "
            f"or pass --secret / set {SECRET_ENV})"
        )
    paths.prepare()
    value = secrets.token_urlsafe(32)
    write_private(paths.secret_file, value + "\n")
    return value


class FolderLock:
    """An exclusive lock on the state folder, held while ``wa-worker dev`` runs
    (two workers must never share one AUTH_DIR). Released when the process ends."""

    def __init__(self, paths: DevPaths) -> None:
        self.paths = paths
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        fd = os.open(self.paths.lock_file, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise DevStateError(
                f"{self.paths.root} is in use by another `wa-worker dev` (stop it, or use another --dir)"
            ) from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
