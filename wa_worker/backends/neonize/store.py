"""The whatsmeow session store on disk: ``AUTH_DIR/<instanceId>/session.db``,
private (folder 0700, files 0600), and whether it holds a paired device."""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

from ...fsutil import FILE_MODE, ensure_private_dir, tighten_tree

DB_NAME = "session.db"


def prepare_store(auth_root: Path, auth_dir: Path) -> Path:
    """Private folders and an empty 0600 database file before Go opens it
    (SQLite gives its -journal/-wal/-shm files the same mode). Returns its path."""
    ensure_private_dir(auth_root)
    ensure_private_dir(auth_dir)
    db = auth_dir / DB_NAME
    if not db.exists():
        os.close(os.open(db, os.O_RDWR | os.O_CREAT, FILE_MODE))
    tighten_tree(auth_dir)
    return db


def is_paired(db: Path, log: logging.Logger | logging.LoggerAdapter[logging.Logger]) -> bool:
    """True only for a store with a device row that has a JID (whatsmeow writes
    it on ``PairSuccess``). Read with Python's sqlite3, read-only: neonize's own
    reader leaks a file descriptor per call and creates missing databases."""
    try:
        if db.stat().st_size == 0:
            return False
    except OSError:
        return False
    try:
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=2.0)
    except sqlite3.Error:
        return _is_paired_via_neonize(db, log)
    try:
        row = conn.execute(
            "SELECT 1 FROM whatsmeow_device WHERE jid IS NOT NULL AND jid != '' LIMIT 1"
        ).fetchone()
        return row is not None
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return False
        return _is_paired_via_neonize(db, log)
    except sqlite3.Error:
        return _is_paired_via_neonize(db, log)
    finally:
        conn.close()


def _is_paired_via_neonize(db: Path, log: logging.Logger | logging.LoggerAdapter[logging.Logger]) -> bool:
    from neonize.aioze.client import ClientFactory  # lazily: importing neonize has process-wide effects

    try:
        return any(d.JID.User for d in ClientFactory.get_all_devices_from_db(str(db)))
    except Exception:  # noqa: BLE001 - a foreign reader of a possibly corrupt file
        log.exception("has_session: cannot read %s", db)
        return False
