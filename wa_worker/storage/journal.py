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

Every outbound row has an ``origin``: ``proxy`` (a ``/queued-messages`` id,
acknowledged as above) or ``api`` (a direct API request, id
``api:<instance>:<Idempotency-Key>``): an API row is never acknowledged to the
proxy, its outcome is read through the API, and an interrupted API send is
always ``delivery_unknown`` (never forgotten, whatever the policy: the key's
promise is "never sent twice"). ``api_requests`` remembers each API request's
body hash and, when it ended before reaching WhatsApp, why.

Error boundary: every public method raises :class:`JournalUnavailable` (never a
raw ``sqlite3`` error). A failed write marks the store unwritable; only
:meth:`Journal.probe_writable` declares it writable again, and only once the
filesystem has headroom (see :func:`headroom_needed`), so a worker never pulls
work while the disk is still full. The schema is versioned (``migrations.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .db import MEMORY, StoreOpenError, open_db, tighten_private
from .migrations import JournalTooNew, migrate

log = logging.getLogger("wa_worker.store")

__all__ = ["ApiRequestRow", "EventRow", "InboundRow", "JournalTooNew", "KnownMessage", "OutboundRow", "Journal", "ReceiptRow", "StoreOpenError",
           "JournalUnavailable", "JournalWriteError"]

JOURNAL_RETENTION_S = 7 * 24 * 3600
DEAD_LETTER_RETENTION_S = 30 * 24 * 3600
MIN_HEADROOM_BYTES = 8 * 1024 * 1024


class JournalUnavailable(Exception):
    """The store cannot be used right now (disk full, read-only, I/O error, locked)."""


class JournalWriteError(JournalUnavailable):
    """A write failed: the store is marked unwritable until the probe finds headroom."""


@dataclass(frozen=True, slots=True)
class InboundRow:
    seq: int
    instance_id: str
    chat_id: str
    wa_message_id: str
    payload: dict[str, Any]
    created_at: float
    attempts: int
    server_errors: int = 0
    next_attempt_at: float = 0.0

    @property
    def chat_key(self) -> tuple[str, str]:
        return (self.instance_id, self.chat_id)


@dataclass(frozen=True, slots=True)
class OutboundRow:
    message_id: str
    instance_id: str
    state: str
    wa_message_id: str | None
    error: str | None
    ack_attempts: int
    error_code: str | None = None  # machine-readable, sent with /mark-failed
    origin: str = "proxy"  # "api": a direct API request, never acknowledged to the proxy
    claim_token: int | None = None  # leases: the token the message was claimed under (acks carry it)
    worker_id: str | None = None  # a shared journal (PostgreSQL): the worker that wrote the row last


@dataclass(frozen=True, slots=True)
class ApiRequestRow:
    """A direct API request: its body's hash, and (``not_sent_code``) why it ended before
    reaching WhatsApp, when it did (then the same key may run again)."""

    message_id: str
    instance_id: str
    idem_key: str
    body_sha256: str
    created_at: float
    not_sent_code: str | None = None
    not_sent_error: str | None = None


@dataclass(frozen=True, slots=True)
class KnownMessage:
    """A message this instance sent or received (the target of a reply or a reaction)."""

    instance_id: str
    wa_message_id: str
    chat_jid: str
    sender_jid: str | None
    from_me: bool


@dataclass(frozen=True, slots=True)
class ReceiptRow:
    """A message's latest unposted receipt; ``message_id`` is the proxy's id when the
    outbound journal knows the WhatsApp id (None: sent from elsewhere, or pruned)."""

    instance_id: str
    wa_message_id: str
    chat_jid: str
    recipient: str
    status: str
    rank: int
    timestamp: float
    attempts: int
    next_attempt_at: float
    message_id: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.instance_id, self.wa_message_id)


@dataclass(frozen=True, slots=True)
class EventRow:
    """One event of the live stream (``GET /api/events``): its sequence number and JSON text."""

    seq: int
    at: float
    instance_id: str
    type: str
    data: str


def headroom_needed(wal_bytes: int, floor: int = MIN_HEADROOM_BYTES) -> int:
    """Free bytes the filesystem must have before the store counts as writable
    again: the floor, or as much as the WAL already holds (it may grow that much
    again before a checkpoint), whichever is larger."""
    return max(floor, wal_bytes)


_HEADS = "SELECT MIN(seq) AS seq FROM inbound GROUP BY instance_id, chat_id"


class Journal:
    """The journal at ``path``. Raises :class:`StoreOpenError` (or
    :class:`JournalTooNew`) when the file cannot be used; never deletes it.

    The SQL here is portable (SQLite and PostgreSQL): :class:`~.pgjournal.PgJournal` runs the same
    methods on a database the fleet shares, where ``owner`` (this worker's id) and ``scope`` (the
    instances it serves now) keep each worker to its own rows."""

    _BEGIN = "BEGIN IMMEDIATE"
    _integrity_errors: tuple[type[Exception], ...] = (sqlite3.IntegrityError,)
    _errors: tuple[type[Exception], ...] = (sqlite3.Error,)
    # a journal of its own (None): every row is this worker's. Shared: the worker's id
    owner: str | None = None
    shared = False
    _db: Any  # a sqlite3.Connection, or pgjournal's connection of the same shape

    def __init__(self, path: Path, *, clock: Any = None, min_headroom_bytes: int = MIN_HEADROOM_BYTES) -> None:
        self._init_common(path, clock, min_headroom_bytes)
        self._memory = str(path) == MEMORY
        self._db = open_db(path)
        try:
            self.schema_version = migrate(self._db, path)
        except StoreOpenError:
            self._db.close()
            raise
        if not self._memory:
            tighten_private(Path(path))

    def _init_common(self, path: Path | str, clock: Any, min_headroom_bytes: int) -> None:
        self.path = path
        self._now = (clock.time if clock is not None else time.time)
        self.min_headroom_bytes = min_headroom_bytes
        self.writable = True
        # a shared journal: the instances this worker serves now (None: all of them; set by the daemon)
        self.scope: Callable[[], Collection[str] | None] = lambda: None

    def close(self) -> None:
        with contextlib.suppress(*self._errors):
            self._db.close()

    def reconnect(self) -> None:
        """Reopen a lost connection to a shared journal (blocking: the daemon runs it in a thread);
        nothing to do for a file."""

    def keepalive(self) -> None:
        """Keep a shared journal's idle connection open (a pooler's idle timeout); a file has none."""

    # ------------------------------------------------------------------ plumbing

    def _write(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        try:
            return self._db.execute(sql, params)
        except self._integrity_errors as exc:
            # a constraint, not the disk: the store itself is fine
            raise JournalUnavailable(f"constraint failed: {exc}") from exc
        except self._errors as exc:
            self._mark_unwritable(exc)
            raise JournalWriteError(str(exc)) from exc

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        try:
            return self._db.execute(sql, params).fetchall()
        except self._errors as exc:
            raise JournalUnavailable(f"read failed: {exc}") from exc

    def _mine(self, column: str = "worker_id") -> tuple[str, tuple[Any, ...]]:
        """A condition (`` AND …``) and its parameters: a shared journal's rows this worker wrote."""
        if self.owner is None:
            return "", ()
        return f" AND {column} = ?", (self.owner,)

    def _in_scope(self, column: str) -> tuple[str, tuple[Any, ...]]:
        """A condition (`` AND …``) and its parameters: a shared journal's rows of the instances this
        worker serves now (``scope``); every row when it serves them all or the journal is its own."""
        ids = self.scope() if self.owner is not None else None
        if ids is None:
            return "", ()
        if not ids:
            return " AND 1 = 0", ()
        return self._in_list(column, ids)

    def _in_list(self, column: str, values: Collection[str]) -> tuple[str, tuple[Any, ...]]:
        return f" AND {column} IN ({','.join('?' * len(values))})", tuple(values)

    def _scalar(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        rows = self._read(sql, params)
        return rows[0][0] if rows else None

    def _mark_unwritable(self, exc: Exception) -> None:
        if self.writable:
            log.error("state store %s is not writable (%s): the worker stops pulling new outbound work "
                      "until it recovers; WhatsApp stays connected", self.path, exc)
        self.writable = False

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        self._write(self._BEGIN)
        try:
            yield
            self._write("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except self._errors as exc:  # SQLite may have rolled back by itself (disk full)
                log.debug("rollback: %s", exc)

    def free_bytes(self) -> int | None:
        """Free bytes on the journal's filesystem (None for an in-memory store)."""
        if self._memory:
            return None
        st = os.statvfs(Path(self.path).parent)
        return st.f_bavail * st.f_frsize

    def _wal_bytes(self) -> int:
        try:
            return os.stat(f"{self.path}-wal").st_size
        except OSError:
            return 0

    def probe_writable(self) -> bool:
        """Is the store writable? Headroom on the filesystem and a tiny real
        write, both required. Used by readiness and to detect recovery: the
        store is declared writable again only here."""
        try:
            free = self.free_bytes()
        except OSError as exc:
            self._mark_unwritable(exc)
            return False
        if free is not None:
            needed = headroom_needed(self._wal_bytes(), self.min_headroom_bytes)
            if free < needed:
                if self.writable:
                    self._mark_unwritable(OSError(f"only {free} bytes free, {needed} needed"))
                return False
        try:
            self.set_meta("probe", str(self._now()))
        except JournalUnavailable:
            return False
        if not self.writable:
            self.writable = True
            log.warning("state store is writable again (%d bytes free)", free or 0)
        return True

    def meta(self, key: str) -> str | None:
        """A small remembered value (e.g. ``leases``: what the proxy said at the last start)."""
        return self._scalar("SELECT value FROM meta WHERE key = ?", (key,))

    def set_meta(self, key: str, value: str) -> None:
        self._write("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, value))

    # ------------------------------------------------------------------ inbound outbox

    def add_inbound(self, instance_id: str, chat_id: str, wa_message_id: str, payload: dict[str, Any]) -> bool:
        """Persist a received message. False if it was already there (a replay)."""
        now = self._now()
        cur = self._write(
            "INSERT INTO inbound (instance_id, chat_id, wa_message_id, payload, created_at, "
            "next_attempt_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (instance_id, chat_id, wa_message_id, json.dumps(payload, ensure_ascii=False), now, now),
        )
        return cur.rowcount == 1

    def due_inbound_heads(self, limit: int = 64, skip: Collection[tuple[str, str]] = ()) -> list[InboundRow]:
        """The oldest pending row of each chat, if it is due, except the chats in
        ``skip`` (in flight): delivering only heads keeps every chat in arrival
        order while chats proceed independently."""
        scope, ids = self._in_scope("i.instance_id")
        rows = self._read(
            f"SELECT i.* FROM inbound i JOIN ({_HEADS}) h ON h.seq = i.seq "
            f"WHERE i.next_attempt_at <= ?{scope} ORDER BY i.seq LIMIT ?",
            (self._now(), *ids, limit + len(skip)),
        )
        heads = [self._inbound_row(r) for r in rows]
        return [h for h in heads if h.chat_key not in skip][:limit]

    def inbound_heads(self, limit: int, skip: Collection[tuple[str, str]] = ()) -> list[InboundRow]:
        """The oldest pending row of each chat not in ``skip``, due or not, the
        earliest due first (one query gives the relay both what to start now
        and when to look again)."""
        scope, ids = self._in_scope("i.instance_id")
        rows = self._read(
            f"SELECT i.* FROM inbound i JOIN ({_HEADS}) h ON h.seq = i.seq{scope} "
            "ORDER BY i.next_attempt_at, i.seq LIMIT ?",
            (*ids, limit + len(skip)),
        )
        heads = [self._inbound_row(r) for r in rows]
        return [h for h in heads if h.chat_key not in skip][:limit]

    def next_inbound_due_at(self, skip: Collection[tuple[str, str]] = ()) -> float | None:
        """When the next head (of a chat not in ``skip``) is due."""
        scope, ids = self._in_scope("i.instance_id")
        rows = self._read(
            f"SELECT i.instance_id, i.chat_id, i.next_attempt_at FROM inbound i JOIN ({_HEADS}) h "
            f"ON h.seq = i.seq{scope} ORDER BY i.next_attempt_at LIMIT ?",
            (*ids, len(skip) + 1),
        )
        for r in rows:
            if (r["instance_id"], r["chat_id"]) not in skip:
                return float(r["next_attempt_at"])
        return None

    def inbound_update_payload(self, seq: int, payload: dict[str, Any]) -> None:
        """Replace a pending row's body (its media uploaded: the url set, the
        download handle dropped), so a restart never fetches the bytes again."""
        self._write("UPDATE inbound SET payload = ? WHERE seq = ?", (json.dumps(payload, ensure_ascii=False), seq))

    def inbound_media_due_now(self, instance_id: str) -> int:
        """Make an instance's rows still waiting for their media due now (it just
        connected: their download can succeed). Returns how many."""
        now = self._now()
        return self._write(
            "UPDATE inbound SET next_attempt_at = ? WHERE instance_id = ? AND next_attempt_at > ? "
            "AND payload LIKE '%\"\\_media\\_handle\"%' ESCAPE '\\'",
            (now, instance_id, now),
        ).rowcount

    def inbound_delivered(self, seq: int) -> None:
        self._write("DELETE FROM inbound WHERE seq = ?", (seq,))

    def inbound_retry_later(self, seq: int, delay_s: float, error: str, *, server_error: bool = False) -> None:
        self._write(
            "UPDATE inbound SET attempts = attempts + 1, server_errors = server_errors + ?, next_attempt_at = ?, "
            "last_error = ? WHERE seq = ?",
            (1 if server_error else 0, self._now() + delay_s, error[:500], seq),
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
        rows = self._read("SELECT * FROM inbound WHERE created_at < ? ORDER BY seq", (cutoff,))
        for r in rows:
            self.inbound_dead_letter(self._inbound_row(r), "expired", None, r["last_error"])
        return len(rows)

    @staticmethod
    def _inbound_row(r: Any) -> InboundRow:
        return InboundRow(r["seq"], r["instance_id"], r["chat_id"], r["wa_message_id"], json.loads(r["payload"]),
                          r["created_at"], r["attempts"], r["server_errors"], r["next_attempt_at"])

    # ------------------------------------------------------------------ outbound journal

    def outbound_get(self, message_id: str) -> OutboundRow | None:
        rows = self._read("SELECT * FROM outbound WHERE message_id = ?", (message_id,))
        return self._outbound_row(rows[0]) if rows else None

    def begin_send(self, message_id: str, instance_id: str, to_jid: str, origin: str = "proxy",
                   claim_token: int | None = None) -> bool:
        """Record ``sending`` (with the lease token it was claimed under, if any). False if the id is
        already journaled (never send twice)."""
        now = self._now()
        cur = self._write(
            "INSERT INTO outbound (message_id, instance_id, state, to_jid, created_at, updated_at, origin, "
            "claim_token, worker_id) VALUES (?, ?, 'sending', ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (message_id, instance_id, to_jid, now, now, origin, claim_token, self.owner),
        )
        return cur.rowcount == 1

    def record_sent(self, message_id: str, wa_message_id: str) -> None:
        """``sent``, and the message joins the index (a later reply or reaction may name it)."""
        now = self._now()
        mine, owner = self._mine()
        with self._tx():
            # only over its own `sending` row: a worker that resumes after its lease moved (frozen, partitioned)
            # never overwrites what the next holder recorded
            self._write(
                "UPDATE outbound SET state = 'sent', wa_message_id = ?, updated_at = ?, next_ack_at = ?, "
                f"ack_attempts = 0 WHERE message_id = ? AND state = 'sending'{mine}",
                (wa_message_id, now, now, message_id, *owner),
            )
            self._write(
                "INSERT INTO message_index (instance_id, wa_message_id, chat_jid, sender_jid, from_me, created_at) "
                "SELECT instance_id, ?, to_jid, NULL, 1, ? FROM outbound WHERE message_id = ? AND to_jid IS NOT NULL "
                "ON CONFLICT DO NOTHING",
                (wa_message_id, now, message_id),
            )

    def record_failure(self, message_id: str, instance_id: str, error: str, code: str = "send_failed",
                       origin: str = "proxy", claim_token: int | None = None) -> None:
        """A message that will not be sent (invalid, send error, unknown outcome); ``code`` is
        the machine-readable reason /mark-failed carries. A row that exists keeps its origin and
        its claim token."""
        now = self._now()
        self._write(
            "INSERT INTO outbound (message_id, instance_id, state, error, error_code, created_at, updated_at, "
            "next_ack_at, origin, claim_token, worker_id) VALUES (?, ?, 'failing', ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(message_id) DO UPDATE SET "
            "state = 'failing', error = excluded.error, error_code = excluded.error_code, "
            "updated_at = excluded.updated_at, next_ack_at = excluded.next_ack_at, "
            "ack_attempts = 0 WHERE outbound.state IN ('sending', 'failing')",
            (message_id, instance_id, error[:500], code[:64], now, now, now, origin, claim_token, self.owner),
        )

    # ------------------------------------------------------------------ message index

    def remember_message(self, instance_id: str, wa_message_id: str, chat_jid: str, sender_jid: str | None,
                         from_me: bool) -> None:
        """Index a received (or otherwise known) message so a reply or reaction can name it.
        A repeat is ignored. Pruned after the journal's retention."""
        self._write(
            "INSERT INTO message_index (instance_id, wa_message_id, chat_jid, sender_jid, from_me, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (instance_id, wa_message_id, chat_jid, sender_jid, 1 if from_me else 0, self._now()),
        )

    def find_message(self, instance_id: str, wa_message_id: str) -> KnownMessage | None:
        """The indexed message ``wa_message_id`` of ``instance_id``, or None (unknown or pruned)."""
        rows = self._read(
            "SELECT * FROM message_index WHERE instance_id = ? AND wa_message_id = ?", (instance_id, wa_message_id)
        )
        if not rows:
            return None
        r = rows[0]
        return KnownMessage(r["instance_id"], r["wa_message_id"], r["chat_jid"], r["sender_jid"], bool(r["from_me"]))

    def send_times(self, instance_id: str, since: float) -> list[float]:
        """When this instance's messages that reached WhatsApp were sent (since ``since``), oldest first."""
        rows = self._read("SELECT created_at FROM outbound WHERE instance_id = ? AND created_at > ? "
                          "AND wa_message_id IS NOT NULL ORDER BY created_at", (instance_id, since))
        return [float(r["created_at"]) for r in rows]

    # ------------------------------------------------------------------ number cache

    def cached_number(self, phone: str, max_age_s: float) -> tuple[str | None] | None:
        """``(jid,)`` WhatsApp gave for ``phone`` within ``max_age_s`` (``(None,)``: not on
        WhatsApp); None when not asked recently."""
        rows = self._read("SELECT jid FROM number_cache WHERE phone = ? AND checked_at > ?",
                          (phone, self._now() - max_age_s))
        return (rows[0]["jid"],) if rows else None

    def cache_number(self, phone: str, jid: str | None) -> None:
        self._write("INSERT INTO number_cache (phone, jid, checked_at) VALUES (?, ?, ?) ON CONFLICT(phone) "
                    "DO UPDATE SET jid = excluded.jid, checked_at = excluded.checked_at", (phone, jid, self._now()))

    # ------------------------------------------------------------------ instance settings

    def save_instance_settings(self, rows: list[tuple[str, dict[str, Any] | None, str | None, str | None]]) -> None:
        """What the edge proxy last said, ``(instance_id, settings, proxy_url, proxy_problem)`` each, in one
        transaction (all None: nothing; the instance's row goes)."""
        with self._tx():
            for instance_id, settings, proxy_url, proxy_problem in rows:
                if settings is None and proxy_url is None and proxy_problem is None:
                    self._write("DELETE FROM instance_settings WHERE instance_id = ?", (instance_id,))
                else:
                    self._write("INSERT INTO instance_settings (instance_id, settings, proxy_url, proxy_problem, "
                                "updated_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT(instance_id) DO UPDATE SET "
                                "settings = excluded.settings, proxy_url = excluded.proxy_url, "
                                "proxy_problem = excluded.proxy_problem, updated_at = excluded.updated_at",
                                (instance_id, json.dumps(settings) if settings is not None else None, proxy_url,
                                 proxy_problem, self._now()))

    def instance_settings(self) -> list[tuple[str, dict[str, Any] | None, str | None, str | None]]:
        """Every saved ``(instance_id, settings, proxy_url, proxy_problem)``."""
        out = []
        for r in self._read("SELECT instance_id, settings, proxy_url, proxy_problem FROM instance_settings"):
            try:
                settings = json.loads(r["settings"]) if r["settings"] else None
            except ValueError:
                settings = None
            out.append((r["instance_id"], settings if isinstance(settings, dict) else None, r["proxy_url"],
                        r["proxy_problem"]))
        return out

    def reack(self, message_id: str, claim_token: int | None = None) -> None:
        """The proxy offered an already-handled message again: acknowledge it
        again (its first acknowledgement was evidently lost). ``claim_token``: the
        token of this new claim (leases), which the acknowledgement carries from now on."""
        now = self._now()
        self._write(
            "UPDATE outbound SET state = CASE state WHEN 'marked' THEN 'sent' WHEN 'failed' THEN 'failing' "
            "ELSE state END, next_ack_at = ?, updated_at = ?, claim_token = COALESCE(?, claim_token), "
            "worker_id = COALESCE(?, worker_id) "
            "WHERE message_id = ? AND state IN ('marked','failed','sent','failing') AND origin = 'proxy'",
            (now, now, claim_token, self.owner, message_id),
        )

    def due_acks(self, limit: int = 64, skip: Collection[str] = ()) -> list[OutboundRow]:
        """Rows whose acknowledgement is due, except the ids in ``skip`` (in flight)."""
        mine, owner = self._mine()
        rows = self._read(
            "SELECT * FROM outbound WHERE state IN ('sent','failing') AND origin = 'proxy' AND next_ack_at <= ?"
            f"{mine} ORDER BY next_ack_at LIMIT ?",
            (self._now(), *owner, limit + len(skip)),
        )
        return [self._outbound_row(r) for r in rows if r["message_id"] not in skip][:limit]

    def next_ack_due_at(self, skip: Collection[str] = ()) -> float | None:
        """When the next acknowledgement (of an id not in ``skip``) is due."""
        mine, owner = self._mine()
        rows = self._read(
            f"SELECT message_id, next_ack_at FROM outbound WHERE state IN ('sent','failing') AND origin = 'proxy'{mine} "
            "ORDER BY next_ack_at LIMIT ?",
            (*owner, len(skip) + 1),
        )
        for r in rows:
            if r["message_id"] not in skip:
                return float(r["next_ack_at"])
        return None

    def ack_done(self, message_id: str) -> None:
        self._write(
            "UPDATE outbound SET state = CASE state WHEN 'sent' THEN 'marked' WHEN 'failing' THEN 'failed' "
            "ELSE state END, next_ack_at = NULL, updated_at = ? WHERE message_id = ?",
            (self._now(), message_id),
        )

    def ack_retry_later(self, message_id: str, delay_s: float) -> None:
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
                 json.dumps({"wa_message_id": row.wa_message_id, "error": row.error,
                             "error_code": row.error_code}), reason, status,
                 (response or "")[:2000], self._now()),
            )
            self.ack_done(row.message_id)

    def recover_unknown_sends(self, at_least_once: bool) -> list[str]:
        """Rows left ``sending`` by a crash. At-most-once: report them failed
        (``delivery_unknown``). At-least-once: forget them so the proxy's next
        offer sends them again. API rows are always ``delivery_unknown``: an
        Idempotency-Key is never sent twice."""
        mine, owner = self._mine()
        rows = self._read(f"SELECT message_id, origin FROM outbound WHERE state = 'sending'{mine}", owner)
        ids = [r[0] for r in rows]
        api = {r[0] for r in rows if r[1] == "api"}
        for mid in ids:
            if at_least_once and mid not in api:
                self._write("DELETE FROM outbound WHERE message_id = ? AND state = 'sending'", (mid,))
            else:
                row = self.outbound_get(mid)
                self.record_failure(mid, row.instance_id if row else "?", "delivery_unknown", "delivery_unknown",
                                    row.origin if row else "proxy")
        return ids

    def adopt_instance(self, instance_id: str, at_least_once: bool) -> list[str]:
        """A shared journal, when this worker starts serving ``instance_id``: the rows other workers
        left for it become this worker's. Their unacknowledged outcomes are acknowledged from here
        (under the token each was claimed with, which the proxy accepts after a move); their sends
        left ``sending`` (the worker died, stopped or was fenced, and its lease moved, so its send is
        over) follow the policy as :meth:`recover_unknown_sends`. Returns those sends' ids."""
        if self.owner is None:
            return []
        now = self._now()
        with self._tx():
            rows = self._read("SELECT message_id, origin FROM outbound WHERE instance_id = ? AND state = 'sending' "
                              "AND worker_id <> ?", (instance_id, self.owner))
            for mid, origin in ((r["message_id"], r["origin"]) for r in rows):
                if at_least_once and origin == "proxy":
                    self._write("DELETE FROM outbound WHERE message_id = ? AND state = 'sending'", (mid,))
                else:
                    self._write("UPDATE outbound SET state = 'failing', error = 'delivery_unknown', "
                                "error_code = 'delivery_unknown', updated_at = ?, next_ack_at = ?, ack_attempts = 0 "
                                "WHERE message_id = ? AND state = 'sending'", (now, now, mid))
            self._write("UPDATE outbound SET worker_id = ?, next_ack_at = ? WHERE instance_id = ? "
                        "AND state IN ('sent','failing') AND worker_id <> ?", (self.owner, now, instance_id, self.owner))
        return [r["message_id"] for r in rows]

    def retry_all_now(self) -> None:
        now = self._now()
        scope, ids = self._in_scope("instance_id")
        mine, owner = self._mine()
        self._write(f"UPDATE inbound SET next_attempt_at = ? WHERE next_attempt_at > ?{scope}", (now, now, *ids))
        self._write(f"UPDATE receipts SET next_attempt_at = ? WHERE next_attempt_at > ? AND rank > posted_rank{scope}",
                    (now, now, *ids))
        self._write("UPDATE outbound SET next_ack_at = ? WHERE state IN ('sent','failing') AND origin = 'proxy' "
                    f"AND next_ack_at > ?{mine}",
                    (now, now, *owner))

    @staticmethod
    def _outbound_row(r: Any) -> OutboundRow:
        return OutboundRow(r["message_id"], r["instance_id"], r["state"], r["wa_message_id"], r["error"],
                           r["ack_attempts"], r["error_code"], r["origin"], r["claim_token"], r["worker_id"])

    # ------------------------------------------------------------------ receipts outbox

    def add_receipt(self, instance_id: str, wa_message_id: str, chat_jid: str, recipient: str, status: str,
                    rank: int, timestamp: float) -> bool:
        """Keep the latest status of a message (coalesced: a lower or equal ``rank`` than the
        one kept or already posted changes nothing). True if the row changed (due now)."""
        now = self._now()
        cur = self._write(
            "INSERT INTO receipts (instance_id, wa_message_id, chat_jid, recipient, status, rank, timestamp, "
            "updated_at, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(instance_id, wa_message_id) DO UPDATE SET status = excluded.status, "
            "rank = excluded.rank, recipient = excluded.recipient, timestamp = excluded.timestamp, "
            "updated_at = excluded.updated_at, next_attempt_at = CASE WHEN receipts.next_attempt_at < excluded.updated_at "
            "THEN receipts.next_attempt_at ELSE excluded.updated_at END "
            "WHERE excluded.rank > receipts.rank",
            (instance_id, wa_message_id, chat_jid, recipient, status, int(rank), timestamp, now, now),
        )
        return cur.rowcount == 1

    def add_receipts(self, instance_id: str, wa_message_ids: Collection[str], chat_jid: str, recipient: str,
                     status: str, rank: int, timestamp: float) -> int:
        """:meth:`add_receipt` for every id of one receipt, in one transaction; returns how many changed."""
        with self._tx():
            return sum(self.add_receipt(instance_id, wa_id, chat_jid, recipient, status, rank, timestamp)
                       for wa_id in wa_message_ids)

    _RECEIPT_SELECT = (
        "SELECT r.*, (SELECT o.message_id FROM outbound o WHERE o.instance_id = r.instance_id "
        "AND o.wa_message_id = r.wa_message_id AND o.origin = 'proxy' LIMIT 1) AS message_id FROM receipts r "
    )

    def receipts_due(self, limit: int) -> list[ReceiptRow]:
        """Unposted receipts due now, the earliest due first, with the proxy's message id when known."""
        scope, ids = self._in_scope("r.instance_id")
        rows = self._read(self._RECEIPT_SELECT + f"WHERE r.rank > r.posted_rank AND r.next_attempt_at <= ?{scope} "
                          "ORDER BY r.next_attempt_at LIMIT ?", (self._now(), *ids, limit))
        return [ReceiptRow(r["instance_id"], r["wa_message_id"], r["chat_jid"], r["recipient"], r["status"],
                           r["rank"], r["timestamp"], r["attempts"], r["next_attempt_at"], r["message_id"])
                for r in rows]

    def next_receipt_due_at(self) -> float | None:
        scope, ids = self._in_scope("instance_id")
        return self._scalar(f"SELECT MIN(next_attempt_at) FROM receipts WHERE rank > posted_rank{scope}", ids)

    def receipts_posted(self, rows: list[ReceiptRow]) -> None:
        """The proxy has these statuses: a newer one that arrived meanwhile stays due."""
        with self._tx():
            for r in rows:
                self._write("UPDATE receipts SET posted_rank = CASE WHEN posted_rank > ? THEN posted_rank ELSE ? END, "
                            "attempts = 0, last_error = NULL WHERE instance_id = ? AND wa_message_id = ?",
                            (r.rank, r.rank, r.instance_id, r.wa_message_id))

    def receipts_retry_later(self, rows: list[ReceiptRow], delay_s: float, error: str) -> None:
        at = self._now() + delay_s
        with self._tx():
            for r in rows:
                self._write("UPDATE receipts SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? "
                            "WHERE instance_id = ? AND wa_message_id = ? AND rank = ?",
                            (at, error[:500], r.instance_id, r.wa_message_id, r.rank))

    def receipts_rejected(self, rows: list[ReceiptRow], reason: str, status: int | None, response: str | None) -> None:
        """The proxy permanently refused a batch: keep a record, never post those statuses again."""
        with self._tx():
            self._write(
                "INSERT INTO dead_letter (kind, instance_id, ref, payload, reason, status_code, response, created_at) "
                "VALUES ('message-status', ?, ?, ?, ?, ?, ?, ?)",
                (rows[0].instance_id, rows[0].wa_message_id,
                 json.dumps([[r.instance_id, r.wa_message_id, r.status] for r in rows]), reason, status,
                 (response or "")[:2000], self._now()),
            )
        self.receipts_posted(rows)

    def receipts_pending(self) -> int:
        return int(self._scalar("SELECT COUNT(*) FROM receipts WHERE rank > posted_rank") or 0)

    # ------------------------------------------------------------------ event log (issue #15)

    def add_events(self, rows: Collection[EventRow]) -> None:
        """Record events under the sequence numbers they were given, in one transaction."""
        sql = "INSERT INTO events (seq, at, instance_id, type, data) VALUES (?, ?, ?, ?, ?)"
        if len(rows) == 1:  # the usual case: one statement, its own transaction
            [r] = rows
            self._write(sql, (r.seq, r.at, r.instance_id, r.type, r.data))
            return
        with self._tx():
            for r in rows:
                self._write(sql, (r.seq, r.at, r.instance_id, r.type, r.data))

    def events_after(self, seq: int, limit: int, instances: Collection[str] | None = None,
                     types: Collection[str] | None = None) -> list[EventRow]:
        """Up to ``limit`` events numbered above ``seq``, in order; only these instances / types when given."""
        sql = "SELECT seq, at, instance_id, type, data FROM events WHERE seq > ?"
        params: list[Any] = [seq]
        for column, values in (("instance_id", instances), ("type", types)):
            if values is not None:
                sql += f" AND {column} IN ({','.join('?' * len(values))})"
                params.extend(values)
        rows = self._read(sql + " ORDER BY seq LIMIT ?", (*params, limit))
        return [EventRow(r["seq"], r["at"], r["instance_id"], r["type"], r["data"]) for r in rows]

    def event_seq_bounds(self) -> tuple[int | None, int]:
        """(the lowest number still kept or None, the highest ever given: 0 before the first)."""
        low = self._scalar("SELECT MIN(seq) FROM events")
        high = self._scalar("SELECT seq FROM sqlite_sequence WHERE name = 'events'")
        return (None if low is None else int(low)), int(high or 0)

    def prune_events(self, before: float, keep_rows: int) -> int:
        """Drop the events before the first one at or after ``before`` (in number order: rows come in time
        order, so this reads only what it deletes) and all but the newest ``keep_rows``."""
        n = self._write("DELETE FROM events WHERE seq < COALESCE((SELECT seq FROM events WHERE at >= ? ORDER BY seq "
                        "LIMIT 1), 9223372036854775807)", (before,)).rowcount
        n += self._write("DELETE FROM events WHERE seq <= (SELECT MAX(seq) FROM events) - ?", (keep_rows,)).rowcount
        return n

    # ------------------------------------------------------------------ housekeeping

    def note_claimed(self, claims: list[tuple[str, str]]) -> None:
        """Remember ``(message id, instance id)`` claims made under a lease token (one transaction)."""
        if not claims:
            return
        now = self._now()
        with self._tx():
            for message_id, instance_id in claims:
                self._write("INSERT INTO claimed (message_id, instance_id, claimed_at, worker_id) VALUES (?, ?, ?, ?) "
                            "ON CONFLICT DO NOTHING", (message_id, instance_id, now, self.owner))

    def claimed_here(self, message_id: str) -> bool:
        """This worker claimed ``message_id`` before (under a lease token)."""
        return self._scalar("SELECT 1 FROM claimed WHERE message_id = ?", (message_id,)) is not None

    def unsent_claims(self, instance_ids: list[str], limit_each: int) -> dict[str, list[str]]:
        """Of the ``claimed`` rows of ``instance_ids`` (a shared journal: this worker's), the ids with no
        ``outbound`` row (claimed here, never begun), oldest claim first, at most ``limit_each`` per
        instance (one pass over the table)."""
        if not instance_ids or limit_each <= 0:
            return {}
        scope, ids = self._in_list("c.instance_id", sorted(set(instance_ids)))
        mine, owner = self._mine("c.worker_id")
        rows = self._read(
            "SELECT message_id, instance_id FROM ("
            " SELECT c.message_id, c.instance_id, ROW_NUMBER() OVER "
            "  (PARTITION BY c.instance_id ORDER BY c.claimed_at, c.message_id) AS n FROM claimed c"
            f" WHERE 1 = 1{scope}{mine}"
            " AND NOT EXISTS (SELECT 1 FROM outbound o WHERE o.message_id = c.message_id)"
            ") AS unsent WHERE n <= ? ORDER BY instance_id, n",
            (*ids, *owner, limit_each))
        out: dict[str, list[str]] = {}
        for r in rows:
            out.setdefault(r["instance_id"], []).append(r["message_id"])
        return out

    def forget_claims(self, message_ids: list[str]) -> int:
        """Forget claims the proxy took back (put back to queued): a later ``prior_claim`` of one of
        them is another worker's claim, not this one's. Returns how many rows went."""
        if not message_ids:
            return 0
        with self._tx():
            return self._write("DELETE FROM claimed WHERE message_id IN (SELECT value FROM json_each(?))",
                               (json.dumps(message_ids),)).rowcount

    def prune(self) -> int:
        now = self._now()
        self._write("DELETE FROM claimed WHERE claimed_at < ?", (now - JOURNAL_RETENTION_S,))
        n = self._write(
            "DELETE FROM outbound WHERE (state IN ('marked','failed') OR (origin = 'api' AND state IN "
            "('sent','failing'))) AND updated_at < ?",
            (now - JOURNAL_RETENTION_S,),
        ).rowcount
        # an API request is remembered as long as its outcome (a key may be used again after that)
        self._write("DELETE FROM api_requests WHERE updated_at < ? AND message_id NOT IN "
                    "(SELECT message_id FROM outbound WHERE state = 'sending')", (now - JOURNAL_RETENTION_S,))
        # the message index shares the retention (not counted: it is no journal row)
        self._write("DELETE FROM message_index WHERE created_at < ?", (now - JOURNAL_RETENTION_S,))
        self._write("DELETE FROM number_cache WHERE checked_at < ?", (now - JOURNAL_RETENTION_S,))
        # receipts too (posted ones, and unposted ones a proxy without /message-status never took)
        self._write("DELETE FROM receipts WHERE updated_at < ?", (now - JOURNAL_RETENTION_S,))
        n += self._write("DELETE FROM dead_letter WHERE created_at < ?", (now - DEAD_LETTER_RETENTION_S,)).rowcount
        return n

    def counts(self) -> dict[str, int]:
        """Rows waiting, by kind (a shared journal: this worker's own, and its instances' outboxes;
        the dead letters of the whole fleet)."""
        q = self._scalar
        scope, ids = self._in_scope("instance_id")
        mine, owner = self._mine()
        return {
            "inbound_pending": q(f"SELECT COUNT(*) FROM inbound WHERE 1 = 1{scope}", ids),
            "inbound_dead_letter": q("SELECT COUNT(*) FROM dead_letter WHERE kind = 'inbound'"),
            "outbound_pending_acks": q("SELECT COUNT(*) FROM outbound WHERE state IN ('sent','failing') "
                                       f"AND origin = 'proxy'{mine}", owner),
            "outbound_in_flight": q(f"SELECT COUNT(*) FROM outbound WHERE state = 'sending'{mine}", owner),
            "dead_letter": q("SELECT COUNT(*) FROM dead_letter"),
            "receipts_pending": q(f"SELECT COUNT(*) FROM receipts WHERE rank > posted_rank{scope}", ids),
        }

    def oldest_pending_age_s(self) -> dict[str, float]:
        """Seconds since the oldest row still waiting: ``inbound`` (not yet taken by the proxy)
        and ``acks`` (an outcome not yet acknowledged); 0 when none waits."""
        now = self._now()
        scope, ids = self._in_scope("instance_id")
        mine, owner = self._mine()
        oldest = {
            "inbound": self._scalar(f"SELECT MIN(created_at) FROM inbound WHERE 1 = 1{scope}", ids),
            "acks": self._scalar("SELECT MIN(created_at) FROM outbound WHERE state IN ('sent','failing') "
                                 f"AND origin = 'proxy'{mine}", owner),
        }
        return {k: 0.0 if v is None else max(0.0, now - v) for k, v in oldest.items()}

    def dead_letters(self, kind: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM dead_letter" + (" WHERE kind = ?" if kind else "") + " ORDER BY id"
        return [dict(r) for r in self._read(sql, (kind,) if kind else ())]

    # ------------------------------------------------------------------ direct API requests

    def api_request(self, message_id: str) -> ApiRequestRow | None:
        rows = self._read("SELECT * FROM api_requests WHERE message_id = ?", (message_id,))
        if not rows:
            return None
        r = rows[0]
        return ApiRequestRow(r["message_id"], r["instance_id"], r["idem_key"], r["body_sha256"], r["created_at"],
                             r["not_sent_code"], r["not_sent_error"])

    def api_request_add(self, message_id: str, instance_id: str, idem_key: str, body_sha256: str) -> bool:
        """Remember a new API request (before anything of it is done). False if its id is known."""
        now = self._now()
        return self._write(
            "INSERT INTO api_requests (message_id, instance_id, idem_key, body_sha256, created_at, "
            "updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", (message_id, instance_id, idem_key, body_sha256, now, now),
        ).rowcount == 1

    def api_request_not_sent(self, message_id: str, code: str | None, error: str | None = None) -> None:
        """Why the request ended before reaching WhatsApp (None: it runs (again) now)."""
        self._write("UPDATE api_requests SET not_sent_code = ?, not_sent_error = ?, updated_at = ? "
                    "WHERE message_id = ?", (code, None if error is None else error[:500], self._now(), message_id))
