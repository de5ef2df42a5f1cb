"""The one SQLite opener (worker journal and dev proxy store).

WAL mode, ``synchronous=NORMAL`` (a committed row survives ``kill -9``),
``busy_timeout``, private modes (folder 0700, files 0600). Anything that keeps
the file from being used -- a folder in its place, a parent that is a file, a
file that is not a database, a read-only file or filesystem -- raises one
:class:`StoreOpenError` naming the path and the cause. A corrupt file is never
deleted nor overwritten: an operator decides what to do with it.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from ..fsutil import DIR_MODE, FILE_MODE, tighten_tree

BUSY_TIMEOUT_MS = 5000
MEMORY = ":memory:"


class StoreOpenError(Exception):
    """The database at ``path`` cannot be opened or used (one clear line)."""

    def __init__(self, path: Path | str, cause: str) -> None:
        super().__init__(f"cannot use the state database {path}: {cause}")
        self.path = str(path)
        self.cause = cause


def open_db(path: Path | str, *, foreign_keys: bool = False) -> sqlite3.Connection:
    """Open (creating if needed) the database at ``path``; ``":memory:"`` works too.
    Raises :class:`StoreOpenError`."""
    memory = str(path) == MEMORY
    p = Path(path)
    if not memory:
        _prepare_file(p)
    try:
        db = sqlite3.connect(str(p) if not memory else MEMORY, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StoreOpenError(p, _describe(exc)) from None
    try:
        db.row_factory = sqlite3.Row
        # the first statement reads the header: a file that is not a database fails here
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if not memory and str(mode).lower() != "wal":
            raise StoreOpenError(p, f"cannot switch to WAL mode (journal_mode is {mode})")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if foreign_keys:
            db.execute("PRAGMA foreign_keys=ON")
        db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        db.close()
        raise StoreOpenError(p, _describe(exc)) from None
    except StoreOpenError:
        db.close()
        raise
    if not memory:
        tighten_private(p)
    return db


def tighten_private(path: Path) -> None:
    """0600 on the database and its ``-wal``/``-shm`` companions."""
    for candidate in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if candidate.is_file():
            tighten_tree(candidate)


def _prepare_file(p: Path) -> None:
    try:
        p.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    except OSError as exc:
        raise StoreOpenError(p, f"cannot create its folder {p.parent} ({exc.strerror or exc})") from None
    try:
        os.chmod(p.parent, DIR_MODE)
    except OSError as exc:
        raise StoreOpenError(p, f"its folder {p.parent} cannot be made private ({exc.strerror or exc})") from None
    if p.is_dir():
        raise StoreOpenError(p, "it is a folder, not a file")
    if p.exists():
        if not os.access(p, os.R_OK | os.W_OK):
            raise StoreOpenError(p, "the file is not readable and writable by this user (or the filesystem "
                                    "is read-only)")
        if not os.access(p.parent, os.W_OK | os.X_OK):
            raise StoreOpenError(p, f"its folder {p.parent} is not writable (SQLite needs it for the WAL)")
        return
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except OSError as exc:
        raise StoreOpenError(p, f"cannot create the file ({exc.strerror or exc})") from None
    os.close(fd)


def _describe(exc: sqlite3.Error) -> str:
    text = str(exc)
    if "not a database" in text or "malformed" in text:
        return f"the file is not a valid SQLite database ({text}); it was left untouched"
    if "readonly" in text or "read-only" in text:
        return f"the database is read-only ({text})"
    return text
