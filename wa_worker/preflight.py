"""Start-up checks of the folders and the journal, before anything is served.

Each failure is one line naming the variable and the cause (the daemon prints
it and exits 2). A file that is not a SQLite database is never opened for
writing, truncated or deleted: it may be the only record of what was sent.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import anyio

from .fsutil import ensure_private_dir

SQLITE_HEADER = b"SQLite format 3\x00"


class StartupError(Exception):
    """One clear line: the variable, the path and what is wrong with it."""


def _cause(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _writable_dir(var: str, folder: Path, what: str = "") -> None:
    """Create ``folder`` (0700) if needed and prove it takes a file: a real
    create + delete, because permission bits say little (root, read-only mounts)."""
    label = f"{var} {what or folder}"
    if folder.exists() and not folder.is_dir():
        raise StartupError(f"{label} is not a directory")
    try:
        ensure_private_dir(folder)
        fd, probe = tempfile.mkstemp(prefix=".wa-worker-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise StartupError(f"{label} is not writable ({_cause(exc)})") from None


def check_auth_dir(path: Path) -> None:
    _writable_dir("AUTH_DIR", path)


def check_state_db(path: Path) -> None:
    if str(path) == ":memory:":
        return
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        st = None  # the folder check below names the cause
    except OSError as exc:
        raise StartupError(f"STATE_DB {path} cannot be read ({_cause(exc)})") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise StartupError(f"STATE_DB {path} is a directory")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise StartupError(f"STATE_DB {path} is not a regular file")
    _writable_dir("STATE_DB", path.parent, f"{path}: its folder {path.parent}")
    if st is None:
        return
    try:
        with open(path, "rb") as f:
            header = f.read(len(SQLITE_HEADER))
        # opened for writing but never written: proves the journal can be updated
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
    except OSError as exc:
        raise StartupError(f"STATE_DB {path} is not writable ({_cause(exc)})") from None
    if header and header != SQLITE_HEADER:
        raise StartupError(f"STATE_DB {path} is not a SQLite database (file kept untouched)")


def check_paths(auth_dir: Path, state_db: Path) -> None:
    """Raise :class:`StartupError` for the first problem found."""
    check_auth_dir(auth_dir)
    check_state_db(state_db)


def check_simulator_store(database_url: str) -> None:
    """``DATABASE_URL`` with the simulator backend: reachable, ``wa_worker_simulator_sessions``
    created if missing. One line without the credentials on failure."""
    # imported here: psycopg is loaded only by workers that keep sessions in PostgreSQL
    from .backends.simstore import SimulatorPgStore, SimulatorStoreUnavailable

    async def check() -> None:
        store = SimulatorPgStore(database_url)
        try:
            await store.open()
        finally:
            await store.close()

    try:
        anyio.run(check)
    except SimulatorStoreUnavailable as exc:
        raise StartupError(f"DATABASE_URL: {exc}") from None


def check_session_store(database_url: str, idle_timeout_s: float) -> None:
    """``DATABASE_URL`` (neonize backend): reachable, and ``wa_worker_sessions``
    exists (created if missing). One line without the credentials on failure."""
    # imported here: psycopg is loaded only by workers that keep sessions in PostgreSQL
    from .backends.neonize.pgstore import PgSessionStore, SessionStoreUnavailable

    store = PgSessionStore(database_url, idle_timeout_s=idle_timeout_s)
    try:
        store.open()
    except SessionStoreUnavailable as exc:
        raise StartupError(f"DATABASE_URL: {exc}") from None
    finally:
        store.close()
