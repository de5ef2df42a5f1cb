"""The worker's durable state: inbound outbox, outbound journal, dead letters.

One SQLite file (WAL mode) per worker at ``STATE_DB``. Every call is one short
transaction on the event-loop thread (tens of microseconds; no network ever
happens inside one). ``synchronous=NORMAL`` in WAL mode survives a process
crash (``kill -9``) without losing a committed row; only a power loss can drop
the last few commits, which is the same window the proxy itself has.

Outbound journal states (a proxy message id is never sent twice):

    (absent) --begin_send--> sending --record_sent--> sent --ack ok--> marked
                                  \\--record_failure--> failing --ack ok--> failed

``sending`` found at start-up means the process died while WhatsApp had the
message: its outcome is unknown (see ``UNKNOWN_SEND_POLICY``).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..fsutil import FILE_MODE, ensure_private_dir, tighten_tree

log = logging.getLogger("wa_worker.store")

SCHEMA = """
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

OUTBOUND_TERMINAL = ("marked", "failed")
JOURNAL_RETENTION_S = 7 * 24 * 3600
DEAD_LETTER_RETENTION_S = 30 * 24 * 3600


class StoreUnavailable(Exception):
    """The store cannot be written (disk full, read-only, I/O error)."""


@dataclass(frozen=True, slots=True)
class InboundRow:
    seq: int
    instance_id: str
    chat_id: str
    wa_message_id: str
    payload: dict[str, Any]
    created_at: float
    attempts: int


@dataclass(frozen=True, slots=True)
class OutboundRow:
    message_id: str
    instance_id: str
    state: str
    wa_message_id: str | None
    error: str | None
    ack_attempts: int


class Store:
    def __init__(self, path: Path, *, clock: Any = None) -> None:
        self.path = path
        self._now = (clock.time if clock is not None else time.time)
        self.writable = True
        self.last_error: str | None = None
        if str(path) != ":memory:":
            ensure_private_dir(path.parent)
            if not path.exists():
                path.touch(mode=FILE_MODE)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        if str(path) != ":memory:":
            tighten_tree(path)
            for suffix in ("-wal", "-shm"):
                side = Path(str(path) + suffix)
                if side.exists():
                    tighten_tree(side)

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------ plumbing

    def _write(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            cur = self._db.execute(sql, params)
        except sqlite3.OperationalError as exc:
            self._mark_unwritable(exc)
            raise StoreUnavailable(str(exc)) from exc
        if not self.writable:
            self.writable = True
            self.last_error = None
            log.warning("state store is writable again")
        return cur

    def _mark_unwritable(self, exc: Exception) -> None:
        if self.writable:
            log.error("state store %s is not writable (%s): the worker stops pulling new outbound work "
                      "until it recovers; WhatsApp stays connected", self.path, exc)
        self.writable = False
        self.last_error = str(exc)

    def probe_writable(self) -> bool:
        """A tiny real write; used by readiness and to detect recovery."""
        try:
            self._write("INSERT INTO meta (key, value) VALUES ('probe', ?) "
                        "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (str(self._now()),))
        except StoreUnavailable:
            return False
        return True

    # ------------------------------------------------------------------ inbound outbox

    def add_inbound(self, instance_id: str, chat_id: str, wa_message_id: str, payload: dict[str, Any]) -> bool:
        """Persist a received message. False if it was already there (a replay)."""
        now = self._now()
        cur = self._write(
            "INSERT OR IGNORE INTO inbound (instance_id, chat_id, wa_message_id, payload, created_at, "
            "next_attempt_at) VALUES (?, ?, ?, ?, ?, ?)",
            (instance_id, chat_id, wa_message_id, json.dumps(payload, ensure_ascii=False), now, now),
        )
        return cur.rowcount == 1

    def due_inbound_heads(self, limit: int = 64) -> list[InboundRow]:
        """The oldest pending row of each chat, if it is due: delivering only
        heads keeps every chat in arrival order while chats proceed in parallel."""
        now = self._now()
        rows = self._db.execute(
            "SELECT i.* FROM inbound i "
            "JOIN (SELECT MIN(seq) AS seq FROM inbound GROUP BY instance_id, chat_id) h ON h.seq = i.seq "
            "WHERE i.next_attempt_at <= ? ORDER BY i.seq LIMIT ?",
            (now, limit),
        ).fetchall()
        return [self._inbound_row(r) for r in rows]

    def next_inbound_due_at(self) -> float | None:
        row = self._db.execute(
            "SELECT MIN(i.next_attempt_at) FROM inbound i "
            "JOIN (SELECT MIN(seq) AS seq FROM inbound GROUP BY instance_id, chat_id) h ON h.seq = i.seq"
        ).fetchone()
        return row[0] if row else None

    def inbound_delivered(self, seq: int) -> None:
        self._write("DELETE FROM inbound WHERE seq = ?", (seq,))

    def inbound_retry_later(self, seq: int, delay_s: float, error: str) -> None:
        self._write(
            "UPDATE inbound SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? WHERE seq = ?",
            (self._now() + delay_s, error[:500], seq),
        )

    def inbound_dead_letter(self, row: InboundRow, reason: str, status: int | None = None,
                            response: str | None = None) -> None:
        with self._tx():
            self._write(
                "INSERT INTO dead_letter (kind, instance_id, ref, payload, reason, status_code, response, "
                "created_at) VALUES ('inbound', ?, ?, ?, ?, ?, ?, ?)",
                (row.instance_id, row.wa_message_id, json.dumps(row.payload, ensure_ascii=False), reason,
                 status, (response or "")[:2000], self._now()),
            )
            self._write("DELETE FROM inbound WHERE seq = ?", (row.seq,))

    def expire_inbound(self, ttl_s: float) -> int:
        """Dead-letter rows older than the TTL; returns how many."""
        cutoff = self._now() - ttl_s
        rows = self._db.execute("SELECT * FROM inbound WHERE created_at < ? ORDER BY seq", (cutoff,)).fetchall()
        for r in rows:
            self.inbound_dead_letter(self._inbound_row(r), "expired", None, r["last_error"])
        return len(rows)

    @staticmethod
    def _inbound_row(r: sqlite3.Row) -> InboundRow:
        return InboundRow(r["seq"], r["instance_id"], r["chat_id"], r["wa_message_id"], json.loads(r["payload"]),
                          r["created_at"], r["attempts"])

    # ------------------------------------------------------------------ outbound journal

    def outbound_get(self, message_id: str) -> OutboundRow | None:
        r = self._db.execute("SELECT * FROM outbound WHERE message_id = ?", (message_id,)).fetchone()
        return self._outbound_row(r) if r else None

    def begin_send(self, message_id: str, instance_id: str, to_jid: str) -> bool:
        """Record ``sending``. False if the id is already journaled (never send twice)."""
        now = self._now()
        cur = self._write(
            "INSERT OR IGNORE INTO outbound (message_id, instance_id, state, to_jid, created_at, updated_at) "
            "VALUES (?, ?, 'sending', ?, ?, ?)",
            (message_id, instance_id, to_jid, now, now),
        )
        return cur.rowcount == 1

    def record_sent(self, message_id: str, wa_message_id: str) -> None:
        now = self._now()
        self._write(
            "UPDATE outbound SET state = 'sent', wa_message_id = ?, updated_at = ?, next_ack_at = ?, "
            "ack_attempts = 0 WHERE message_id = ?",
            (wa_message_id, now, now, message_id),
        )

    def record_failure(self, message_id: str, instance_id: str, error: str) -> None:
        """A message that will not be sent (invalid, send error, unknown outcome)."""
        now = self._now()
        self._write(
            "INSERT INTO outbound (message_id, instance_id, state, error, created_at, updated_at, next_ack_at) "
            "VALUES (?, ?, 'failing', ?, ?, ?, ?) ON CONFLICT(message_id) DO UPDATE SET state = 'failing', "
            "error = excluded.error, updated_at = excluded.updated_at, next_ack_at = excluded.next_ack_at, "
            "ack_attempts = 0 WHERE outbound.state IN ('sending', 'failing')",
            (message_id, instance_id, error[:500], now, now, now),
        )

    def reack(self, message_id: str) -> None:
        """The proxy offered an already-handled message again: acknowledge it
        again (its first acknowledgement was evidently lost)."""
        now = self._now()
        self._write(
            "UPDATE outbound SET state = CASE state WHEN 'marked' THEN 'sent' WHEN 'failed' THEN 'failing' "
            "ELSE state END, next_ack_at = ?, updated_at = ? WHERE message_id = ? AND state IN "
            "('marked','failed','sent','failing')",
            (now, now, message_id),
        )

    def due_acks(self, limit: int = 64) -> list[OutboundRow]:
        rows = self._db.execute(
            "SELECT * FROM outbound WHERE state IN ('sent','failing') AND next_ack_at <= ? "
            "ORDER BY next_ack_at LIMIT ?",
            (self._now(), limit),
        ).fetchall()
        return [self._outbound_row(r) for r in rows]

    def next_ack_due_at(self) -> float | None:
        row = self._db.execute("SELECT MIN(next_ack_at) FROM outbound WHERE state IN ('sent','failing')").fetchone()
        return row[0] if row else None

    def ack_done(self, message_id: str) -> None:
        self._write(
            "UPDATE outbound SET state = CASE state WHEN 'sent' THEN 'marked' WHEN 'failing' THEN 'failed' "
            "ELSE state END, next_ack_at = NULL, updated_at = ? WHERE message_id = ?",
            (self._now(), message_id),
        )

    def ack_retry_later(self, message_id: str, delay_s: float, error: str) -> None:
        self._write(
            "UPDATE outbound SET ack_attempts = ack_attempts + 1, next_ack_at = ?, updated_at = ? "
            "WHERE message_id = ?",
            (self._now() + delay_s, self._now(), message_id),
        )

    def ack_rejected(self, row: OutboundRow, reason: str, status: int | None, response: str | None) -> None:
        """The proxy permanently refused an acknowledgement: stop retrying, keep a record."""
        with self._tx():
            self._write(
                "INSERT INTO dead_letter (kind, instance_id, ref, payload, reason, status_code, response, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                ("mark-sent" if row.state == "sent" else "mark-failed", row.instance_id, row.message_id,
                 json.dumps({"wa_message_id": row.wa_message_id, "error": row.error}), reason, status,
                 (response or "")[:2000], self._now()),
            )
            self.ack_done(row.message_id)

    def recover_unknown_sends(self, at_least_once: bool) -> list[str]:
        """Rows left ``sending`` by a crash. At-most-once: report them failed
        (``delivery_unknown``). At-least-once: forget them so the proxy's next
        offer sends them again."""
        ids = [r[0] for r in self._db.execute("SELECT message_id FROM outbound WHERE state = 'sending'")]
        for mid in ids:
            if at_least_once:
                self._write("DELETE FROM outbound WHERE message_id = ? AND state = 'sending'", (mid,))
            else:
                row = self.outbound_get(mid)
                self.record_failure(mid, row.instance_id if row else "?", "delivery_unknown")
        return ids

    def retry_all_now(self) -> None:
        now = self._now()
        self._write("UPDATE inbound SET next_attempt_at = ? WHERE next_attempt_at > ?", (now, now))
        self._write("UPDATE outbound SET next_ack_at = ? WHERE state IN ('sent','failing') AND next_ack_at > ?",
                    (now, now))

    @staticmethod
    def _outbound_row(r: sqlite3.Row) -> OutboundRow:
        return OutboundRow(r["message_id"], r["instance_id"], r["state"], r["wa_message_id"], r["error"],
                           r["ack_attempts"])

    # ------------------------------------------------------------------ housekeeping

    def prune(self) -> int:
        now = self._now()
        n = self._write(
            "DELETE FROM outbound WHERE state IN ('marked','failed') AND updated_at < ?",
            (now - JOURNAL_RETENTION_S,),
        ).rowcount
        n += self._write("DELETE FROM dead_letter WHERE created_at < ?", (now - DEAD_LETTER_RETENTION_S,)).rowcount
        return n

    def counts(self) -> dict[str, int]:
        q = self._db.execute
        return {
            "inbound_pending": q("SELECT COUNT(*) FROM inbound").fetchone()[0],
            "inbound_dead_letter": q("SELECT COUNT(*) FROM dead_letter WHERE kind = 'inbound'").fetchone()[0],
            "outbound_pending_acks": q("SELECT COUNT(*) FROM outbound WHERE state IN ('sent','failing')").fetchone()[0],
            "outbound_in_flight": q("SELECT COUNT(*) FROM outbound WHERE state = 'sending'").fetchone()[0],
            "dead_letter": q("SELECT COUNT(*) FROM dead_letter").fetchone()[0],
        }

    def dead_letters(self, kind: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM dead_letter" + (" WHERE kind = ?" if kind else "") + " ORDER BY id"
        return [dict(r) for r in self._db.execute(sql, (kind,) if kind else ())]

    class _Tx:
        def __init__(self, store: "Store") -> None:
            self.store = store

        def __enter__(self) -> None:
            self.store._write("BEGIN IMMEDIATE")

        def __exit__(self, exc_type: Any, *_: Any) -> None:
            if exc_type is None:
                try:
                    self.store._write("COMMIT")
                except StoreUnavailable:
                    self.store._db.execute("ROLLBACK")
                    raise
            else:
                self.store._db.execute("ROLLBACK")

    def _tx(self) -> "Store._Tx":
        return Store._Tx(self)
