"""SQLite storage of the reference edge proxy used by ``wa-worker dev``.

Three tables:

* ``instances``: one row per WhatsApp account (status, QR data URL, phone number);
* ``outbound``: the send queue (``queued → sending → sent | failed``);
* ``inbound``: received messages, unique per ``(instance_id, wa_message_id)``.

Every method is synchronous and short; the proxy calls them from its event
loop (a dev tool with one process and a handful of rows per second).
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..storage.db import open_db

STATUSES = ("CONNECTING", "CONNECTED", "DISCONNECTED")
CLAIM_LEASE_S = 300.0  # re-offer claims older than 5 minutes (as the Supabase kit)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    id           TEXT PRIMARY KEY,
    status       TEXT NOT NULL DEFAULT 'DISCONNECTED',
    qr_code      TEXT,
    phone_number TEXT,
    reason       TEXT,
    priority     INTEGER NOT NULL DEFAULT 0,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbound (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT NOT NULL UNIQUE,
    instance_id   TEXT NOT NULL REFERENCES instances(id) ON DELETE CASCADE,
    to_addr       TEXT NOT NULL,
    body          TEXT NOT NULL,
    status        TEXT NOT NULL DEFAULT 'queued',
    claimed_at    REAL,
    claims        INTEGER NOT NULL DEFAULT 0,
    wa_message_id TEXT,
    error         TEXT,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbound_status ON outbound(status, instance_id, seq);
CREATE TABLE IF NOT EXISTS inbound (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id   TEXT NOT NULL REFERENCES instances(id) ON DELETE CASCADE,
    wa_message_id TEXT NOT NULL,
    from_jid      TEXT NOT NULL,
    to_jid        TEXT,
    body          TEXT NOT NULL,
    chat_id       TEXT,
    sender_id     TEXT,
    from_me       INTEGER NOT NULL DEFAULT 0,
    is_group      INTEGER NOT NULL DEFAULT 0,
    push_name     TEXT,
    timestamp     REAL,
    received_at   REAL NOT NULL,
    UNIQUE (instance_id, wa_message_id)
);
"""


class UnknownInstance(LookupError):
    pass


class UnknownMessage(LookupError):
    pass


class InstanceExists(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class StatusChange:
    instance_id: str
    old_status: str
    old_reason: str | None
    status: str
    phone_number: str | None
    reason: str | None


class DevStore:
    """The reference proxy's database (one file, WAL mode)."""

    def __init__(self, path: Path | str, *, clock: Any = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._db = open_db(path, foreign_keys=True)  # the worker's opener: WAL, 0700/0600
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ helpers

    def _now(self) -> float:
        return float(self._clock())

    def _one(self, sql: str, params: Any = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._db.execute(sql, params).fetchone()

    def _all(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # ------------------------------------------------------------------ instances

    def add_instance(self, instance_id: str, *, priority: int = 0) -> dict[str, Any]:
        now = self._now()
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO instances (id, priority, created_at, updated_at) VALUES (?, ?, ?, ?)",
                    (instance_id, priority, now, now),
                )
            except sqlite3.IntegrityError:
                raise InstanceExists(instance_id) from None
        inst = self.get_instance(instance_id)
        assert inst is not None
        return inst

    def get_instance(self, instance_id: str) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM instances WHERE id = ?", (instance_id,))
        return dict(row) if row else None

    def has_instance(self, instance_id: str) -> bool:
        return self._one("SELECT 1 FROM instances WHERE id = ?", (instance_id,)) is not None

    def list_instances(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._all("SELECT * FROM instances ORDER BY created_at, id")]

    def count_instances(self) -> int:
        row = self._one("SELECT COUNT(*) FROM instances")
        return int(row[0]) if row else 0

    def disconnected_instances(self) -> list[dict[str, Any]]:
        rows = self._all(
            "SELECT id, priority FROM instances WHERE status IN ('DISCONNECTED', 'CONNECTING') "
            "ORDER BY priority DESC, created_at, id"
        )
        return [{"id": r["id"], "priority": r["priority"]} for r in rows]

    def update_status(
        self,
        instance_id: str,
        status: str,
        *,
        qr_code: str | None,
        phone_number: str | None = None,
        reason: str | None = None,
    ) -> StatusChange:
        """DevStore a status report. Raises :class:`UnknownInstance`."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        now = self._now()
        with self._lock:
            old = self._db.execute("SELECT * FROM instances WHERE id = ?", (instance_id,)).fetchone()
            if old is None:
                raise UnknownInstance(instance_id)
            # keep the last known phone number unless a new one is reported
            phone = phone_number if phone_number else old["phone_number"]
            new_reason = reason if status == "DISCONNECTED" else None
            self._db.execute(
                "UPDATE instances SET status = ?, qr_code = ?, phone_number = ?, reason = ?, updated_at = ? "
                "WHERE id = ?",
                (status, qr_code, phone, new_reason, now, instance_id),
            )
        return StatusChange(
            instance_id=instance_id,
            old_status=old["status"],
            old_reason=old["reason"],
            status=status,
            phone_number=phone,
            reason=new_reason,
        )

    # ------------------------------------------------------------------ outbound

    def queue_message(self, instance_id: str, to: str, body: str) -> dict[str, Any]:
        """Queue a message. Raises :class:`UnknownInstance`."""
        now = self._now()
        # random ids: a fresh proxy.db never reuses an id the worker's journal remembers
        message_id = "m-" + secrets.token_hex(8)
        with self._lock:
            if self._db.execute("SELECT 1 FROM instances WHERE id = ?", (instance_id,)).fetchone() is None:
                raise UnknownInstance(instance_id)
            self._db.execute(
                "INSERT INTO outbound (id, instance_id, to_addr, body, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (message_id, instance_id, to, body, now, now),
            )
        msg = self.get_message(message_id)
        assert msg is not None
        return msg

    def get_message(self, message_id: str) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM outbound WHERE id = ?", (message_id,))
        return _outbound_dict(row) if row else None

    def claim_messages(
        self, instance_id: str | None = None, *, limit: int = 50, lease_s: float = CLAIM_LEASE_S
    ) -> list[dict[str, Any]]:
        """Claim queued messages (and re-offer stale claims), oldest first.

        With ``instance_id=None`` (batch mode) only messages of CONNECTED
        instances are handed out: the others would sit claimed for a lease.
        """
        now = self._now()
        stale = now - lease_s
        if instance_id is None:
            scope = "instance_id IN (SELECT id FROM instances WHERE status = 'CONNECTED')"
            scope_params: tuple[Any, ...] = ()
        else:
            scope = "instance_id = ?"
            scope_params = (instance_id,)
        sql = (
            "UPDATE outbound SET status = 'sending', claimed_at = ?, claims = claims + 1, updated_at = ? "
            "WHERE seq IN ("
            f"  SELECT seq FROM outbound WHERE {scope} AND "
            "  (status = 'queued' OR (status = 'sending' AND claimed_at < ?)) "
            "  ORDER BY seq LIMIT ?"
            ") RETURNING seq, id, instance_id, to_addr, body"
        )
        with self._lock:
            rows = self._db.execute(sql, (now, now, *scope_params, stale, limit)).fetchall()
        rows = sorted(rows, key=lambda r: r["seq"])
        return [
            {"id": r["id"], "instanceId": r["instance_id"], "to": r["to_addr"], "body": r["body"]}
            for r in rows
        ]

    def mark_sent(self, message_id: str, wa_message_id: str | None) -> tuple[dict[str, Any], bool]:
        """Mark a message sent (terminal, idempotent). Returns (message, changed)."""
        now = self._now()
        with self._lock:
            row = self._db.execute("SELECT status FROM outbound WHERE id = ?", (message_id,)).fetchone()
            if row is None:
                raise UnknownMessage(message_id)
            changed = row["status"] != "sent"
            if changed:
                # the worker's word that WhatsApp has it beats an earlier failure report
                self._db.execute(
                    "UPDATE outbound SET status = 'sent', wa_message_id = ?, error = NULL, updated_at = ? "
                    "WHERE id = ?",
                    (wa_message_id, now, message_id),
                )
        msg = self.get_message(message_id)
        assert msg is not None
        return msg, changed

    def mark_failed(self, message_id: str, error: str) -> tuple[dict[str, Any], bool]:
        """Mark a message failed (never overrides ``sent``). Returns (message, changed)."""
        now = self._now()
        with self._lock:
            row = self._db.execute("SELECT status FROM outbound WHERE id = ?", (message_id,)).fetchone()
            if row is None:
                raise UnknownMessage(message_id)
            changed = row["status"] not in ("sent", "failed")
            if changed:
                self._db.execute(
                    "UPDATE outbound SET status = 'failed', error = ?, updated_at = ? WHERE id = ?",
                    (error, now, message_id),
                )
        msg = self.get_message(message_id)
        assert msg is not None
        return msg, changed

    def list_outbound(self, instance_id: str | None = None, *, limit: int = 50) -> list[dict[str, Any]]:
        """The most recent outbound messages, newest first."""
        if instance_id is None:
            rows = self._all("SELECT * FROM outbound ORDER BY seq DESC LIMIT ?", (limit,))
        else:
            rows = self._all(
                "SELECT * FROM outbound WHERE instance_id = ? ORDER BY seq DESC LIMIT ?", (instance_id, limit)
            )
        return [_outbound_dict(r) for r in rows]

    # ------------------------------------------------------------------ inbound

    def add_inbound(self, instance_id: str, rec: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """DevStore an inbound message; a replay of the same wa_message_id is a no-op.

        Returns (stored message, inserted). Raises :class:`UnknownInstance`.
        """
        now = self._now()
        with self._lock:
            if self._db.execute("SELECT 1 FROM instances WHERE id = ?", (instance_id,)).fetchone() is None:
                raise UnknownInstance(instance_id)
            cur = self._db.execute(
                "INSERT INTO inbound (instance_id, wa_message_id, from_jid, to_jid, body, chat_id, sender_id, "
                "from_me, is_group, push_name, timestamp, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (instance_id, wa_message_id) DO NOTHING",
                (
                    instance_id,
                    rec["wa_message_id"],
                    rec["from"],
                    rec.get("to"),
                    rec["body"],
                    rec.get("chat_id"),
                    rec.get("sender_id"),
                    1 if rec.get("from_me") else 0,
                    1 if rec.get("is_group") else 0,
                    rec.get("push_name"),
                    rec.get("timestamp"),
                    now,
                ),
            )
            inserted = cur.rowcount == 1
            row = self._db.execute(
                "SELECT * FROM inbound WHERE instance_id = ? AND wa_message_id = ?",
                (instance_id, rec["wa_message_id"]),
            ).fetchone()
        return _inbound_dict(row), inserted

    def list_inbound(self, instance_id: str | None = None, *, limit: int = 50) -> list[dict[str, Any]]:
        """The most recent inbound messages, newest first."""
        if instance_id is None:
            rows = self._all("SELECT * FROM inbound ORDER BY seq DESC LIMIT ?", (limit,))
        else:
            rows = self._all(
                "SELECT * FROM inbound WHERE instance_id = ? ORDER BY seq DESC LIMIT ?", (instance_id, limit)
            )
        return [_inbound_dict(r) for r in rows]


def _outbound_dict(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "instanceId": row["instance_id"],
        "to": row["to_addr"],
        "body": row["body"],
        "status": row["status"],
        "claimed_at": row["claimed_at"],
        "claims": row["claims"],
        "wa_message_id": row["wa_message_id"],
        "error": row["error"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


def _inbound_dict(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "instanceId": row["instance_id"],
        "wa_message_id": row["wa_message_id"],
        "from": row["from_jid"],
        "to": row["to_jid"],
        "body": row["body"],
        "chat_id": row["chat_id"],
        "sender_id": row["sender_id"],
        "from_me": bool(row["from_me"]),
        "is_group": bool(row["is_group"]),
        "push_name": row["push_name"],
        "timestamp": row["timestamp"],
        "received_at": row["received_at"],
    }
