"""The journal file itself: versioned schema, migrations with data, refusal of
unusable files (folder, corrupt, unwritable, too new), one error boundary."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from wa_worker.storage.db import StoreOpenError, open_db
from wa_worker.storage.migrations import WORKER_MIGRATIONS, JournalTooNew, Migration, migrate, user_version
from wa_worker.storage.journal import Journal, JournalUnavailable

LATEST = WORKER_MIGRATIONS[-1].version

# The schema every worker shipped before the journal was versioned (user_version 0),
# copied verbatim from wa_worker/storage/store.py as it was.
LEGACY_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbound (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id     TEXT NOT NULL,
    chat_id         TEXT NOT NULL,
    wa_message_id   TEXT NOT NULL,
    payload         TEXT NOT NULL,
    created_at      REAL NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error      TEXT,
    UNIQUE (instance_id, wa_message_id)
);
CREATE INDEX IF NOT EXISTS inbound_chat ON inbound (instance_id, chat_id, seq);
CREATE INDEX IF NOT EXISTS inbound_due ON inbound (next_attempt_at);

CREATE TABLE IF NOT EXISTS outbound (
    message_id      TEXT PRIMARY KEY,
    instance_id     TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('sending','sent','marked','failing','failed')),
    to_jid          TEXT,
    wa_message_id   TEXT,
    error           TEXT,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    ack_attempts    INTEGER NOT NULL DEFAULT 0,
    next_ack_at     REAL
);
CREATE INDEX IF NOT EXISTS outbound_ack ON outbound (next_ack_at) WHERE state IN ('sent','failing');
CREATE INDEX IF NOT EXISTS outbound_updated ON outbound (updated_at);

CREATE TABLE IF NOT EXISTS dead_letter (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    kind            TEXT NOT NULL,
    instance_id     TEXT NOT NULL,
    ref             TEXT NOT NULL,
    payload         TEXT,
    reason          TEXT NOT NULL,
    status_code     INTEGER,
    response        TEXT,
    created_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letter_created ON dead_letter (created_at);

CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def make_legacy_journal(path: Path) -> None:
    """A journal as a deployed (unversioned) worker leaves it, with rows in every table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(LEGACY_SCHEMA)
    db.execute("INSERT INTO inbound (instance_id, chat_id, wa_message_id, payload, created_at, attempts, "
               "next_attempt_at, last_error) VALUES ('acme', 'c1@s.whatsapp.net', 'WA1', ?, 100.0, 3, 0.0, "
               "'HTTP 500')", (json.dumps({"body": "olá", "wa_message_id": "WA1"}),))
    db.execute("INSERT INTO inbound (instance_id, chat_id, wa_message_id, payload, created_at, next_attempt_at) "
               "VALUES ('acme', 'c1@s.whatsapp.net', 'WA2', '{\"body\": \"second\"}', 101.0, 0.0)")
    db.execute("INSERT INTO outbound (message_id, instance_id, state, to_jid, wa_message_id, created_at, "
               "updated_at, ack_attempts, next_ack_at) VALUES ('m1', 'acme', 'sent', 'j', 'WAX', 1.0, 2.0, 4, 0.0)")
    db.execute("INSERT INTO outbound (message_id, instance_id, state, to_jid, created_at, updated_at) "
               "VALUES ('m2', 'acme', 'sending', 'j', 1.0, 1.0)")
    db.execute("INSERT INTO dead_letter (kind, instance_id, ref, reason, status_code, created_at) "
               "VALUES ('inbound', 'acme', 'WA0', 'rejected by proxy', 422, 50.0)")
    db.execute("INSERT INTO meta (key, value) VALUES ('probe', '1')")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    db.close()


def test_legacy_journal_with_rows_is_adopted_as_version_1_and_migrated(tmp_path):
    path = tmp_path / "state" / "wa-worker.db"
    make_legacy_journal(path)
    s = Journal(path)
    assert s.schema_version == LATEST
    assert user_version(s._db) == LATEST
    heads = s.due_inbound_heads()
    assert [(h.wa_message_id, h.attempts, h.server_errors) for h in heads] == [("WA1", 3, 0)]
    assert heads[0].payload == {"body": "olá", "wa_message_id": "WA1"}
    s.inbound_delivered(heads[0].seq)
    assert [h.wa_message_id for h in s.due_inbound_heads()] == ["WA2"]  # order kept
    m1 = s.outbound_get("m1")
    assert m1 is not None and (m1.state, m1.wa_message_id, m1.ack_attempts) == ("sent", "WAX", 4)
    assert [r.message_id for r in s.due_acks()] == ["m1"]
    assert s.begin_send("m2", "acme", "j") is False  # still never sent twice
    assert s.recover_unknown_sends(at_least_once=False) == ["m2"]
    assert [(d["ref"], d["status_code"]) for d in s.dead_letters()] == [("WA0", 422)]
    s.close()
    # opening again is a no-op: same version, same rows
    s2 = Journal(path)
    assert s2.schema_version == LATEST and s2.counts()["inbound_pending"] == 1
    s2.close()


def test_fresh_journal_is_latest_version_and_private(tmp_path):
    path = tmp_path / "st" / "db"
    s = Journal(path)
    assert user_version(s._db) == LATEST
    assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert s._db.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    s.add_inbound("a", "c", "w", {})
    assert oct(os.stat(path.parent).st_mode & 0o777) == "0o700"
    for p in (path, Path(f"{path}-wal")):
        assert oct(os.stat(p).st_mode & 0o777) == "0o600", p


def test_journal_newer_than_the_code_is_refused_untouched(tmp_path):
    path = tmp_path / "db"
    Journal(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {LATEST + 1}")
    db.commit()
    db.close()
    before = path.read_bytes()
    with pytest.raises(JournalTooNew) as err:
        Journal(path)
    assert isinstance(err.value, StoreOpenError)
    assert str(path) in str(err.value) and f"version is {LATEST + 1}" in str(err.value)
    assert path.read_bytes() == before


def test_another_applications_database_is_refused_untouched(tmp_path):
    path = tmp_path / "app.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    db.execute("INSERT INTO customers (name) VALUES ('Maria')")
    db.commit()
    db.close()
    with pytest.raises(StoreOpenError, match="not a wa-worker journal.*customers"):
        Journal(path)
    db = sqlite3.connect(path)
    assert {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} == {"customers"}
    db.close()


def test_a_failing_migration_step_leaves_the_previous_version(tmp_path):
    steps = (
        Migration(1, "one", "CREATE TABLE a (x INTEGER);"),
        Migration(2, "two", "CREATE TABLE b (x INTEGER); INSERT INTO no_such_table VALUES (1);"),
    )
    db = open_db(tmp_path / "db")
    with pytest.raises(StoreOpenError, match="migration failed"):
        migrate(db, tmp_path / "db", steps, frozenset())
    assert user_version(db) == 1
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "a" in tables and "b" not in tables


def test_state_db_that_is_a_folder_is_a_clear_error(tmp_path):
    path = tmp_path / "db"
    path.mkdir()
    with pytest.raises(StoreOpenError, match="is a folder"):
        Journal(path)
    assert path.is_dir()


def test_state_db_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "plain").write_text("x")
    with pytest.raises(StoreOpenError, match="cannot create its folder") as err:
        Journal(tmp_path / "plain" / "db")
    assert str(tmp_path / "plain" / "db") in str(err.value)


def test_corrupt_state_db_is_refused_and_never_overwritten(tmp_path):
    path = tmp_path / "db"
    junk = b"this is not a database, it is a note somebody left here\n" * 200
    path.write_bytes(junk)
    with pytest.raises(StoreOpenError, match="not a valid SQLite database") as err:
        Journal(path)
    assert str(path) in str(err.value)
    assert path.read_bytes() == junk
    assert not Path(f"{path}-wal").exists()


def test_unwritable_state_db_is_a_clear_error(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        path = mnt / "state" / "db"
        s = Journal(path)
        s.add_inbound("a", "c", "w1", {})
        s.close()
        before = path.read_bytes()
        res = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True)
        assert res.returncode == 0, res.stderr
        with pytest.raises(StoreOpenError, match="Read-only file system|read-only") as err:
            Journal(path)
        assert str(path) in str(err.value)
        assert path.read_bytes() == before
        with pytest.raises(StoreOpenError, match="cannot create"):
            Journal(mnt / "other" / "db")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_every_read_maps_sqlite_errors_to_store_unavailable(tmp_path):
    path = tmp_path / "db"
    s = Journal(path)
    s.add_inbound("a", "c", "w1", {})
    s.begin_send("m", "a", "j")
    other = sqlite3.connect(path, isolation_level=None)
    for table in ("inbound", "outbound", "dead_letter"):
        other.execute(f"ALTER TABLE {table} RENAME TO {table}_gone")
    reads = {
        "due_inbound_heads": lambda: s.due_inbound_heads(),
        "next_inbound_due_at": lambda: s.next_inbound_due_at(),
        "due_acks": lambda: s.due_acks(),
        "next_ack_due_at": lambda: s.next_ack_due_at(),
        "outbound_get": lambda: s.outbound_get("m"),
        "counts": lambda: s.counts(),
        "dead_letters": lambda: s.dead_letters(),
        "expire_inbound": lambda: s.expire_inbound(1.0),
        "recover_unknown_sends": lambda: s.recover_unknown_sends(False),
    }
    for name, call in reads.items():
        with pytest.raises(JournalUnavailable):
            call()
        assert s.writable, name  # a failed read does not stop the worker pulling work
    with pytest.raises(JournalUnavailable):
        s.add_inbound("a", "c", "w2", {})
    assert not s.writable
    other.close()


def test_failed_transaction_rolls_back_and_raises_store_unavailable(tmp_path):
    path = tmp_path / "db"
    s = Journal(path)
    s.add_inbound("a", "c", "w1", {"x": 1})
    head = s.due_inbound_heads()[0]
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("ALTER TABLE dead_letter RENAME TO dead_letter_gone")
    with pytest.raises(JournalUnavailable):
        s.inbound_dead_letter(head, "test")
    assert not s._db.in_transaction
    other.execute("ALTER TABLE dead_letter_gone RENAME TO dead_letter")
    assert [h.wa_message_id for h in s.due_inbound_heads()] == ["w1"]  # not deleted without its record
    other.close()


def test_probe_requires_headroom_before_declaring_writable(tmp_path, caplog):
    s = Journal(tmp_path / "db")
    free = s.free_bytes()
    assert free is not None and free > 0
    s.min_headroom_bytes = free * 1000  # more than this filesystem will ever have
    assert s.probe_writable() is False
    assert not s.writable and "bytes free" in caplog.text
    s.min_headroom_bytes = 1
    assert s.probe_writable() is True and s.writable


def test_dev_proxy_store_uses_the_same_opener(tmp_path):
    from wa_worker.dev.store import DevStore

    path = tmp_path / "dev" / "proxy.db"
    dev = DevStore(path)
    dev.add_instance("acme")
    assert dev._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert dev._db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert dev._db.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    assert oct(os.stat(path.parent).st_mode & 0o777) == "0o700"
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    dev.close()
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all\n" * 100)
    with pytest.raises(StoreOpenError, match="not a valid SQLite database"):
        DevStore(junk)
    assert junk.read_bytes() == b"not sqlite at all\n" * 100
