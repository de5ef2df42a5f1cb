"""SQLite storage of the reference edge proxy used by ``wa-worker dev``.

Tables:

* ``instances``: one row per WhatsApp account (status, QR data URL, phone number,
  its own settings and ``proxy_url`` with the change number ``settings_seq``);
* ``outbound``: the send queue (``queued → sending → sent | failed``), with the
  message's type and content fields (docs/proxy-contract.md, "Message types");
* ``inbound``: received messages, unique per ``(instance_id, wa_message_id)``,
  with their type, media metadata, reply, reaction, location and contact fields;
* ``media`` / ``uploads``: media bytes kept as files ``<media dir>/<sha256>``
  (0600), and which ``(instance_id, wa_message_id)`` uploaded which file.

The schema is versioned with ``PRAGMA user_version`` by the worker's own
migration runner (:func:`wa_worker.storage.migrations.migrate`): a dev database
written before versioning is adopted as version 1 and migrated in place.

Every method is synchronous and short; the proxy calls them from its event
loop (a dev tool with one process and a handful of rows per second). Every
write that changes what the dev page shows bumps :attr:`DevStore.changes`
(the page's stream, :mod:`.changes`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from ..fsutil import DIR_MODE
from ..storage.db import MEMORY, open_db
from ..storage.migrations import Migration, migrate
from .changes import ChangeFeed
from .leasing import LeaseAnswer, LeaseRequest, lease_call, lease_notices

STATUSES = ("CONNECTING", "CONNECTED", "DISCONNECTED")
CLAIM_LEASE_S = 300.0  # re-offer claims older than 5 minutes (as the Supabase kit's CLAIM_LEASE_SECONDS)
CLAIM_LEASE_ENV = "WA_DEV_CLAIM_LEASE_S"  # another claim lease (tests: a claim a worker dropped comes back sooner)
MAX_CLAIM_TOKENS = 16  # the lease tokens a message was claimed under, kept for acknowledgements

V1_SCHEMA = """
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

# issue #11: every kind of message, both ways
V2_MESSAGE_TYPES = """
ALTER TABLE outbound ADD COLUMN type TEXT;
ALTER TABLE outbound ADD COLUMN media_url TEXT;
ALTER TABLE outbound ADD COLUMN media_sha256 TEXT;
ALTER TABLE outbound ADD COLUMN mimetype TEXT;
ALTER TABLE outbound ADD COLUMN filename TEXT;
ALTER TABLE outbound ADD COLUMN reply_to TEXT;
ALTER TABLE outbound ADD COLUMN reaction TEXT;
ALTER TABLE outbound ADD COLUMN latitude REAL;
ALTER TABLE outbound ADD COLUMN longitude REAL;
ALTER TABLE outbound ADD COLUMN loc_name TEXT;
ALTER TABLE outbound ADD COLUMN loc_address TEXT;
ALTER TABLE outbound ADD COLUMN contact_name TEXT;
ALTER TABLE outbound ADD COLUMN contact_phone TEXT;
ALTER TABLE outbound ADD COLUMN vcard TEXT;
ALTER TABLE outbound ADD COLUMN error_code TEXT;
ALTER TABLE inbound ADD COLUMN type TEXT NOT NULL DEFAULT 'text';
ALTER TABLE inbound ADD COLUMN media_url TEXT;
ALTER TABLE inbound ADD COLUMN mimetype TEXT;
ALTER TABLE inbound ADD COLUMN filename TEXT;
ALTER TABLE inbound ADD COLUMN size INTEGER;
ALTER TABLE inbound ADD COLUMN sha256 TEXT;
ALTER TABLE inbound ADD COLUMN seconds INTEGER;
ALTER TABLE inbound ADD COLUMN media_error TEXT;
ALTER TABLE inbound ADD COLUMN quoted_id TEXT;
ALTER TABLE inbound ADD COLUMN reaction TEXT;
ALTER TABLE inbound ADD COLUMN target_id TEXT;
ALTER TABLE inbound ADD COLUMN latitude REAL;
ALTER TABLE inbound ADD COLUMN longitude REAL;
ALTER TABLE inbound ADD COLUMN loc_name TEXT;
ALTER TABLE inbound ADD COLUMN loc_address TEXT;
ALTER TABLE inbound ADD COLUMN contact_name TEXT;
ALTER TABLE inbound ADD COLUMN contact_vcard TEXT;
ALTER TABLE inbound ADD COLUMN contact_phone TEXT;
ALTER TABLE inbound ADD COLUMN view_once INTEGER NOT NULL DEFAULT 0;
CREATE TABLE media (
    sha256     TEXT PRIMARY KEY,
    mimetype   TEXT NOT NULL,
    size       INTEGER NOT NULL,
    filename   TEXT,
    created_at REAL NOT NULL
);
CREATE TABLE uploads (
    instance_id   TEXT NOT NULL,
    wa_message_id TEXT NOT NULL,
    sha256        TEXT NOT NULL REFERENCES media(sha256),
    created_at    REAL NOT NULL,
    PRIMARY KEY (instance_id, wa_message_id)
);
"""

# issue #12: pairing with a code (the phone to pair, the code the worker pushed)
V3_PAIRING_CODE = """
ALTER TABLE instances ADD COLUMN pair_phone TEXT;
ALTER TABLE instances ADD COLUMN pair_code TEXT;
"""

# issue #12: the latest receipt of each sent message, calls (video, rejected) and bans
V4_RECEIPTS_CALLS_BANS = """
ALTER TABLE outbound ADD COLUMN receipt_status TEXT;
ALTER TABLE outbound ADD COLUMN receipt_at REAL;
ALTER TABLE outbound ADD COLUMN receipt_by TEXT;
ALTER TABLE inbound ADD COLUMN call_video INTEGER;
ALTER TABLE inbound ADD COLUMN call_rejected INTEGER;
ALTER TABLE instances ADD COLUMN ban_code TEXT;
ALTER TABLE instances ADD COLUMN ban_expires_at REAL;
CREATE INDEX outbound_wa_id ON outbound(instance_id, wa_message_id);
"""

# what went wrong with a DISCONNECTED instance, for a person (the worker's status "detail")
V5_STATUS_DETAIL = """
ALTER TABLE instances ADD COLUMN reason_detail TEXT;
"""

# issue #12: each instance's own settings and upstream proxy, and a change number for
# GET /instance-settings?since= (changes only)
V6_INSTANCE_SETTINGS = """
ALTER TABLE instances ADD COLUMN settings TEXT;
ALTER TABLE instances ADD COLUMN proxy_url TEXT;
ALTER TABLE instances ADD COLUMN settings_seq INTEGER NOT NULL DEFAULT 0;
CREATE INDEX instances_settings_seq ON instances(settings_seq);
"""

# issue #13: leases (instance ownership across a fleet of workers) and the token of each claim
V7_LEASES = """
ALTER TABLE instances ADD COLUMN lease_token INTEGER NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN lease_holder TEXT;
ALTER TABLE instances ADD COLUMN lease_expires_at REAL;
ALTER TABLE instances ADD COLUMN lease_revoked INTEGER NOT NULL DEFAULT 0;
CREATE INDEX instances_lease_holder ON instances(lease_holder);
ALTER TABLE outbound ADD COLUMN claim_token INTEGER;
ALTER TABLE outbound ADD COLUMN claim_tokens TEXT;
CREATE TABLE workers (
    id        TEXT PRIMARY KEY,
    capacity  INTEGER NOT NULL,
    last_seen REAL NOT NULL
);
"""

# issue #15 in a fleet: where API clients reach each worker (its API_PUBLIC_URL), for GET /lease-holder
V8_WORKER_API_URL = """
ALTER TABLE workers ADD COLUMN api_url TEXT;
"""

DEV_MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial", V1_SCHEMA),
    Migration(2, "message types and media", V2_MESSAGE_TYPES),
    Migration(3, "pairing code", V3_PAIRING_CODE),
    Migration(4, "receipts, calls, bans", V4_RECEIPTS_CALLS_BANS),
    Migration(5, "status detail", V5_STATUS_DETAIL),
    Migration(6, "instance settings", V6_INSTANCE_SETTINGS),
    Migration(7, "leases", V7_LEASES),
    Migration(8, "worker api_url", V8_WORKER_API_URL),
)
RECEIPT_RANK = {"delivered": 1, "read": 2, "played": 3}
# the tables of a dev database written before versioning (user_version 0)
V1_TABLES = frozenset({"instances", "outbound", "inbound"})
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

# outbound content columns ↔ the queued message's fields (docs/proxy-contract.md)
_OUT_FIELDS = (
    ("type", "type"), ("media_url", "media_url"), ("mimetype", "mimetype"), ("filename", "filename"),
    ("reply_to", "reply_to"), ("reaction", "reaction"), ("latitude", "latitude"), ("longitude", "longitude"),
    ("loc_name", "name"), ("loc_address", "address"), ("vcard", "vcard"),
)


UNCHANGED = object()  # set_instance_settings: leave proxy_url as it is


class UnknownInstance(LookupError):
    pass


class UnknownMessage(LookupError):
    pass


class InstanceExists(ValueError):
    pass


class LeaseLost(Exception):
    """A fenced call whose ``lease_token`` is not the instance's current one (HTTP 409)."""


@dataclass(frozen=True, slots=True)
class StatusChange:
    instance_id: str
    old_status: str
    old_reason: str | None
    status: str
    phone_number: str | None
    reason: str | None


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _changes(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """A write the page shows: bump the store's change feed after it (an empty claim changed nothing)."""

    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        result = method(*args, **kwargs)
        if result != []:
            store = args[0]
            assert isinstance(store, DevStore)
            store.changes.bump()
        return result

    return wrapper


def _claim_lease_s(raw: str | None) -> float:
    """``WA_DEV_CLAIM_LEASE_S`` (seconds, 1 to 86400), else :data:`CLAIM_LEASE_S`."""
    try:
        value = float(raw) if raw else CLAIM_LEASE_S
    except ValueError:
        return CLAIM_LEASE_S
    return value if 1.0 <= value <= 86_400.0 else CLAIM_LEASE_S


class DevStore:
    """The reference proxy's database (one file, WAL mode)."""

    def __init__(self, path: Path | str, *, clock: Any = time.time, media_dir: Path | str | None = None) -> None:
        """``media_dir``: where media files go (default ``<db folder>/media``; a
        temporary folder, removed by :meth:`close`, for an in-memory database)."""
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self.changes = ChangeFeed()  # bumped by every write the dev page shows
        self.claim_lease_s = _claim_lease_s(os.environ.get(CLAIM_LEASE_ENV))
        self._db = open_db(path, foreign_keys=True)  # the worker's opener: WAL, 0700/0600
        try:
            migrate(self._db, path, DEV_MIGRATIONS, V1_TABLES)
        except BaseException:
            self._db.close()
            raise
        self._temp_media = media_dir is None and str(path) == MEMORY
        if media_dir is not None:
            self.media_dir = Path(media_dir)
        elif self._temp_media:
            self.media_dir = Path(tempfile.mkdtemp(prefix="wa-dev-media-"))
        else:
            self.media_dir = self.path.parent / "media"
        self.media_dir.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        os.chmod(self.media_dir, DIR_MODE)

    def close(self) -> None:
        with self._lock:
            self._db.close()
        if self._temp_media:
            shutil.rmtree(self.media_dir, ignore_errors=True)

    # ------------------------------------------------------------------ helpers

    def _now(self) -> float:
        return float(self._clock())

    def _one(self, sql: str, params: Any = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._db.execute(sql, params).fetchone()

    def _all(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    @contextlib.contextmanager
    def _transaction(self) -> Any:
        """One write transaction (the caller holds ``self._lock``)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ------------------------------------------------------------------ leases

    @_changes
    def lease(self, req: LeaseRequest, ttl: float) -> LeaseAnswer:
        """One ``POST /leases`` in one transaction (:func:`~wa_worker.dev.leasing.lease_call`)."""
        with self._lock, self._transaction():
            return lease_call(self._db, req, self._now(), ttl)

    def lease_notices(self, ttl: float) -> list[str]:
        """Live workers whose next ``/leases`` call would get a grant or a revocation."""
        with self._lock, self._transaction():
            return lease_notices(self._db, self._now(), ttl)

    def workers(self, ttl: float) -> list[dict[str, Any]]:
        """The workers that called ``/leases`` (live: within ``ttl``), with the leases they hold."""
        rows = self._all(
            "SELECT w.id, w.capacity, w.last_seen, w.api_url, (SELECT COUNT(*) FROM instances i "
            "WHERE i.lease_holder = w.id AND i.lease_revoked = 0) AS held FROM workers w ORDER BY w.id")
        now = self._now()
        return [{"id": r["id"], "capacity": r["capacity"], "last_seen": r["last_seen"],
                 "live": r["last_seen"] >= now - ttl, "held": r["held"], "api_url": r["api_url"]} for r in rows]

    def lease_holder(self, instance_id: str) -> str | None:
        """The worker holding the instance's lease (None: free or revoked)."""
        row = self._one("SELECT lease_holder FROM instances WHERE id = ? AND lease_revoked = 0", (instance_id,))
        return str(row[0]) if row is not None and row[0] is not None else None

    def lease_holder_of(self, instance_id: str) -> dict[str, Any] | None:
        """``GET /lease-holder``: the holder of a live, unreleased, unrevoked, unexpired lease and
        the api_url its last ``/leases`` call gave (None when it gave none)."""
        row = self._one(
            "SELECT i.id, i.lease_holder, w.api_url FROM instances i LEFT JOIN workers w ON w.id = i.lease_holder "
            "WHERE i.id = ? AND i.lease_holder IS NOT NULL AND i.lease_revoked = 0 AND i.lease_expires_at >= ?",
            (instance_id, self._now()))
        if row is None:
            return None
        return {"instanceId": row["id"], "worker_id": row["lease_holder"], "api_url": row["api_url"]}

    def leased_with_queued(self, worker_id: str | None, limit: int) -> list[str]:
        """Instances with queued messages, of ``worker_id``'s leases (None: every instance)."""
        rows = self._all(
            "SELECT DISTINCT o.instance_id FROM outbound o JOIN instances i ON i.id = o.instance_id "
            "WHERE o.status = 'queued' AND (:w IS NULL OR (i.lease_holder = :w AND i.lease_revoked = 0)) "
            "ORDER BY o.instance_id LIMIT :n", {"w": worker_id, "n": limit})
        return [str(r[0]) for r in rows]

    # ------------------------------------------------------------------ instances

    @_changes
    def add_instance(self, instance_id: str, *, priority: int = 0, pair_phone: str | None = None) -> dict[str, Any]:
        now = self._now()
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO instances (id, priority, pair_phone, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                    (instance_id, priority, pair_phone, now, now),
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
        """Discovery items; ``settings`` and ``proxy_url`` once either was ever set."""
        rows = self._all(
            "SELECT id, priority, pair_phone, settings, proxy_url, settings_seq FROM instances "
            "WHERE status IN ('DISCONNECTED', 'CONNECTING') ORDER BY priority DESC, created_at, id"
        )
        return [{"id": r["id"], "priority": r["priority"], **({"pair_phone": r["pair_phone"]} if r["pair_phone"] else {}),
                 **(_settings_fields(r) if r["settings_seq"] else {})}
                for r in rows]

    @_changes
    def set_instance_settings(self, instance_id: str, *, settings: dict[str, Any] | None = None,
                              replace: bool = False, proxy_url: str | None | object = UNCHANGED) -> dict[str, Any]:
        """Merge ``settings`` into the instance's (a ``None`` value removes its key; ``replace``:
        start from none) and set ``proxy_url`` (None: dial directly). Raises :class:`UnknownInstance`."""
        with self._lock:  # one writer: the change number stays unique and ordered
            row = self._db.execute("SELECT settings, proxy_url FROM instances WHERE id = ?", (instance_id,)).fetchone()
            if row is None:
                raise UnknownInstance(instance_id)
            merged = {} if replace or not row["settings"] else json.loads(row["settings"])
            for key, value in (settings or {}).items():
                if value is None:
                    merged.pop(key, None)
                else:
                    merged[key] = value
            url = row["proxy_url"] if proxy_url is UNCHANGED else proxy_url
            self._db.execute(
                "UPDATE instances SET settings = ?, proxy_url = ?, updated_at = ?, "
                "settings_seq = (SELECT COALESCE(MAX(settings_seq), 0) + 1 FROM instances) WHERE id = ?",
                (json.dumps(merged) if merged else None, url, self._now(), instance_id))
        inst = self.get_instance(instance_id)
        assert inst is not None
        return inst

    def instance_settings(self, since: int) -> tuple[list[dict[str, Any]], int]:
        """``GET /instance-settings``: the instances changed after change number ``since``, and the
        newest change number (the next cursor)."""
        rows = self._all("SELECT id, settings, proxy_url, settings_seq FROM instances WHERE settings_seq > ? "
                         "ORDER BY settings_seq", (since,))
        top = self._one("SELECT COALESCE(MAX(settings_seq), 0) FROM instances")
        return [{"id": r["id"], **_settings_fields(r)} for r in rows], int(top[0]) if top else 0

    @_changes
    def update_status(
        self,
        instance_id: str,
        status: str,
        *,
        qr_code: str | None,
        phone_number: str | None = None,
        reason: str | None = None,
        pair_code: str | None = None,
        ban_code: str | None = None,
        ban_expires_at: float | None = None,
        detail: str | None = None,
        lease_token: int | None = None,
    ) -> StatusChange:
        """Store a status report (``pair_code`` kept only while CONNECTING). Raises :class:`UnknownInstance`,
        or :class:`LeaseLost` when ``lease_token`` is given and is not the instance's current one."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        now = self._now()
        with self._lock:
            old = self._db.execute("SELECT * FROM instances WHERE id = ?", (instance_id,)).fetchone()
            if old is None:
                raise UnknownInstance(instance_id)
            if lease_token is not None and old["lease_token"] != lease_token:
                raise LeaseLost(instance_id)
            # keep the last known phone number unless a new one is reported
            phone = phone_number if phone_number else old["phone_number"]
            new_reason = reason if status == "DISCONNECTED" else None
            self._db.execute(
                "UPDATE instances SET status = ?, qr_code = ?, phone_number = ?, reason = ?, pair_code = ?, "
                "ban_code = ?, ban_expires_at = ?, reason_detail = ?, updated_at = ? WHERE id = ?",
                (status, qr_code, phone, new_reason, pair_code if status == "CONNECTING" else None,
                 ban_code if status == "DISCONNECTED" else None,
                 ban_expires_at if status == "DISCONNECTED" else None,
                 detail if status == "DISCONNECTED" else None, now, instance_id),
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

    @_changes
    def queue_message(
        self, instance_id: str, to: str, body: str, content: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Queue a message; ``content`` maps outbound content columns (``type``,
        ``media_url``, ``media_sha256``, ``mimetype``, ...) to values the caller
        has validated. Raises :class:`UnknownInstance`."""
        now = self._now()
        # random ids: a fresh proxy.db never reuses an id the worker's journal remembers
        message_id = "m-" + secrets.token_hex(8)
        with self._lock:
            if self._db.execute("SELECT 1 FROM instances WHERE id = ?", (instance_id,)).fetchone() is None:
                raise UnknownInstance(instance_id)
            cols = {"id": message_id, "instance_id": instance_id, "to_addr": to, "body": body,
                    "created_at": now, "updated_at": now}
            for key, value in (content or {}).items():
                if key not in _OUT_CONTENT_COLUMNS:
                    raise ValueError(f"unknown outbound column {key!r}")
                cols[key] = value
            self._db.execute(
                f"INSERT INTO outbound ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
                tuple(cols.values()),
            )
        msg = self.get_message(message_id)
        assert msg is not None
        return msg

    def get_message(self, message_id: str) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM outbound WHERE id = ?", (message_id,))
        return _outbound_dict(row) if row else None

    # long: one claim, with its fencing and prior_claim rules, reads best in one place
    @_changes
    def claim_messages(
        self, instance_id: str | None = None, *, limit: int = 50, lease_s: float | None = None,
        lease_token: int | None = None, worker_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Claim queued messages (and re-offer stale claims), oldest first.

        With ``instance_id=None`` (batch mode) only messages of CONNECTED
        instances are handed out: the others would sit claimed for a lease;
        with ``worker_id`` too, only those of the instances it holds a lease on.
        ``lease_token`` (with ``instance_id``) must be the instance's current lease, still
        held (not released, revoked nor expired: a worker fences itself at TTL/2), else
        :class:`LeaseLost` and nothing is claimed.

        A claim made under a lease records its token (``claim_token``); a ``sending``
        claim is offered again once it is older than ``lease_s``, or at once when its
        token is no longer the instance's lease (the lease moved), then with
        ``prior_claim: true`` when the new claim's token differs.
        """
        now = self._now()
        fenced = lease_token is not None or (instance_id is None and worker_id is not None)
        if instance_id is None:
            scope = "i.status = 'CONNECTED'"
            scope_params: tuple[Any, ...] = ()
            if worker_id is not None:
                scope += " AND i.lease_holder = ? AND i.lease_revoked = 0 AND i.lease_expires_at >= ?"
                scope_params = (worker_id, now)
        else:
            scope = "o.instance_id = ?"
            scope_params = (instance_id,)
        out = []
        with self._lock, self._transaction():
            if instance_id is not None and lease_token is not None:
                lease = self._db.execute("SELECT lease_token, lease_holder, lease_revoked, lease_expires_at "
                                         "FROM instances WHERE id = ?", (instance_id,)).fetchone()
                if lease is None:
                    raise UnknownInstance(instance_id)
                if (lease["lease_token"] != lease_token or lease["lease_holder"] is None or lease["lease_revoked"]
                        or lease["lease_expires_at"] < now):
                    raise LeaseLost(instance_id)
            rows = self._db.execute(
                "SELECT o.seq, o.status, o.claim_token, o.claim_tokens, i.lease_token AS current "
                f"FROM outbound o JOIN instances i ON i.id = o.instance_id WHERE {scope} AND "
                "(o.status = 'queued' OR (o.status = 'sending' AND (o.claimed_at < ? OR "
                " (o.claim_token IS NOT NULL AND o.claim_token != i.lease_token)))) "
                "ORDER BY o.seq LIMIT ?", (*scope_params, now - (self.claim_lease_s if lease_s is None else lease_s), limit)).fetchall()
            for r in rows:
                token = (lease_token if lease_token is not None else r["current"]) if fenced else None
                tokens = (r["claim_tokens"] or "").split(",") if r["claim_tokens"] else []
                if token is not None:
                    tokens = [t for t in tokens if t != str(token)][-(MAX_CLAIM_TOKENS - 1):] + [str(token)]
                claimed = self._db.execute(
                    "UPDATE outbound SET status = 'sending', claimed_at = ?, claims = claims + 1, updated_at = ?, "
                    "claim_token = ?, claim_tokens = ? WHERE seq = ? RETURNING *",
                    (now, now, token, ",".join(tokens) or None, r["seq"])).fetchone()
                item = _queued_dict(claimed)
                if token is not None:
                    item["lease_token"] = token
                    if r["status"] == "sending" and r["claim_token"] != token:
                        item["prior_claim"] = True
                out.append(item)
        return out

    def _check_ack(self, message_id: str, lease_token: int | None) -> sqlite3.Row:
        """The message's row; :class:`LeaseLost` when ``lease_token`` is given and the message was
        claimed under leases but never under that token (the caller holds ``self._lock``)."""
        row = self._db.execute("SELECT status, claim_token, claim_tokens FROM outbound WHERE id = ?",
                               (message_id,)).fetchone()
        if row is None:
            raise UnknownMessage(message_id)
        if lease_token is not None and row["claim_tokens"] and str(lease_token) not in row["claim_tokens"].split(","):
            raise LeaseLost(message_id)
        return row

    @_changes
    def mark_sent(self, message_id: str, wa_message_id: str | None,
                  lease_token: int | None = None) -> tuple[dict[str, Any], bool]:
        """Mark a message sent (terminal, idempotent). Returns (message, changed).
        ``lease_token``: the token it was claimed under (:class:`LeaseLost` otherwise)."""
        now = self._now()
        with self._lock:
            row = self._check_ack(message_id, lease_token)
            changed = row["status"] != "sent"
            if changed:
                # the worker's word that WhatsApp has it beats an earlier failure report
                self._db.execute(
                    "UPDATE outbound SET status = 'sent', wa_message_id = ?, error = NULL, error_code = NULL, "
                    "updated_at = ? "
                    "WHERE id = ?",
                    (wa_message_id, now, message_id),
                )
        msg = self.get_message(message_id)
        assert msg is not None
        return msg, changed

    @_changes
    def mark_failed(
        self, message_id: str, error: str, error_code: str | None = None, lease_token: int | None = None
    ) -> tuple[dict[str, Any], bool]:
        """Mark a message failed (never overrides ``sent``). Returns (message, changed).
        ``lease_token``: as for :meth:`mark_sent`."""
        now = self._now()
        with self._lock:
            row = self._check_ack(message_id, lease_token)
            changed = row["status"] not in ("sent", "failed")
            if changed:
                self._db.execute(
                    "UPDATE outbound SET status = 'failed', error = ?, error_code = ?, updated_at = ? "
                    "WHERE id = ?",
                    (error, error_code, now, message_id),
                )
        msg = self.get_message(message_id)
        assert msg is not None
        return msg, changed

    @_changes
    def record_receipt(self, instance_id: str, message_id: str | None, wa_message_id: str, status: str,
                       at: float | None, recipient: str | None) -> dict[str, Any] | None:
        """Keep a sent message's latest receipt (``delivered`` < ``read`` < ``played``; never
        backwards). Found by ``message_id``, else by the WhatsApp id. Returns the message
        when its receipt changed, None otherwise (unknown message, or not newer)."""
        rank = RECEIPT_RANK[status]
        with self._lock:
            row = None
            if message_id:
                row = self._db.execute("SELECT id, receipt_status FROM outbound WHERE id = ? AND instance_id = ?",
                                       (message_id, instance_id)).fetchone()
            if row is None:
                row = self._db.execute("SELECT id, receipt_status FROM outbound WHERE instance_id = ? AND "
                                       "wa_message_id = ?", (instance_id, wa_message_id)).fetchone()
            if row is None or RECEIPT_RANK.get(row["receipt_status"] or "", 0) >= rank:
                return None
            self._db.execute("UPDATE outbound SET receipt_status = ?, receipt_at = ?, receipt_by = ?, updated_at = ? "
                             "WHERE id = ?", (status, at, recipient, self._now(), row["id"]))
            found = row["id"]
        return self.get_message(found)

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

    @_changes
    def add_inbound(self, instance_id: str, rec: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """DevStore an inbound message; a replay of the same wa_message_id is a no-op.

        Returns (stored message, inserted). Raises :class:`UnknownInstance`.
        """
        now = self._now()
        with self._lock:
            if self._db.execute("SELECT 1 FROM instances WHERE id = ?", (instance_id,)).fetchone() is None:
                raise UnknownInstance(instance_id)
            cols = _inbound_columns(instance_id, rec, now)
            cur = self._db.execute(
                f"INSERT INTO inbound ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)}) "
                "ON CONFLICT (instance_id, wa_message_id) DO NOTHING",
                tuple(cols.values()),
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

    # ------------------------------------------------------------------ media

    def media_path(self, sha256: str) -> Path:
        if not SHA256_RE.fullmatch(sha256):
            raise ValueError("not a sha256")
        return self.media_dir / sha256

    def add_media(self, tmp: Path, sha256: str, mimetype: str, filename: str | None) -> dict[str, Any]:
        """Keep the file ``tmp`` (its SHA-256 computed by the caller) as ``<media dir>/<sha256>``;
        the same bytes twice are one file. Returns the media record."""
        dest = self.media_path(sha256)
        os.replace(tmp, dest)
        with self._lock:
            self._db.execute(
                "INSERT INTO media (sha256, mimetype, size, filename, created_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (sha256) DO NOTHING",
                (sha256, mimetype, dest.stat().st_size, filename, self._now()),
            )
        info = self.get_media(sha256)
        assert info is not None
        return info

    def get_media(self, sha256: str) -> dict[str, Any] | None:
        if not SHA256_RE.fullmatch(sha256):
            return None
        row = self._one("SELECT * FROM media WHERE sha256 = ?", (sha256,))
        if row is None or not (self.media_dir / sha256).is_file():
            return None
        return dict(row)

    def get_upload(self, instance_id: str, wa_message_id: str) -> str | None:
        """The sha256 already uploaded for this message, if any."""
        row = self._one(
            "SELECT u.sha256 FROM uploads u JOIN media m ON m.sha256 = u.sha256 "
            "WHERE u.instance_id = ? AND u.wa_message_id = ?",
            (instance_id, wa_message_id),
        )
        if row is None or not (self.media_dir / row[0]).is_file():
            return None
        return str(row[0])

    def record_upload(self, instance_id: str, wa_message_id: str, sha256: str) -> str:
        """Remember the upload of ``sha256`` for this message; the first one wins.
        Returns the sha256 the message is bound to."""
        with self._lock:
            self._db.execute(
                "INSERT INTO uploads (instance_id, wa_message_id, sha256, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (instance_id, wa_message_id) DO UPDATE SET sha256 = excluded.sha256 "
                "WHERE NOT EXISTS (SELECT 1 FROM media WHERE media.sha256 = uploads.sha256)",
                (instance_id, wa_message_id, sha256, self._now()),
            )
            row = self._db.execute(
                "SELECT sha256 FROM uploads WHERE instance_id = ? AND wa_message_id = ?",
                (instance_id, wa_message_id),
            ).fetchone()
        return str(row[0])

    def discard(self, tmp: Path) -> None:
        with contextlib.suppress(OSError):
            tmp.unlink()


_OUT_CONTENT_COLUMNS = frozenset(
    {"type", "media_url", "media_sha256", "mimetype", "filename", "reply_to", "reaction", "latitude",
     "longitude", "loc_name", "loc_address", "contact_name", "contact_phone", "vcard"}
)


def _settings_fields(row: sqlite3.Row) -> dict[str, Any]:
    return {"settings": json.loads(row["settings"]) if row["settings"] else None, "proxy_url": row["proxy_url"]}


def _queued_dict(row: sqlite3.Row) -> dict[str, Any]:
    """A claimed row as ``GET /queued-messages`` hands it out: only the fields it has
    (a text message is exactly the first contract's record). Media stored here is
    named by ``media_sha256``; the proxy turns it into a ``media_url`` on itself."""
    out: dict[str, Any] = {"id": row["id"], "instanceId": row["instance_id"], "to": row["to_addr"],
                           "body": row["body"]}
    for column, key in _OUT_FIELDS:
        if row[column] is not None:
            out[key] = row[column]
    if row["media_sha256"] is not None:
        out["media_sha256"] = row["media_sha256"]
    if row["contact_name"] is not None or row["contact_phone"] is not None:
        out["contact"] = {"name": row["contact_name"], "phone": row["contact_phone"]}
    return out


def _sub(rec: dict[str, Any], key: str) -> dict[str, Any]:
    value = rec.get(key)
    return value if isinstance(value, dict) else {}


def _inbound_columns(instance_id: str, rec: dict[str, Any], now: float) -> dict[str, Any]:
    media, reaction, contact = _sub(rec, "media"), _sub(rec, "reaction"), _sub(rec, "contact")
    return {
        "instance_id": instance_id,
        "wa_message_id": rec["wa_message_id"],
        "from_jid": rec["from"],
        "to_jid": rec.get("to"),
        "body": rec.get("body") or "",
        "chat_id": rec.get("chat_id"),
        "sender_id": rec.get("sender_id"),
        "from_me": 1 if rec.get("from_me") else 0,
        "is_group": 1 if rec.get("is_group") else 0,
        "push_name": rec.get("push_name"),
        "timestamp": rec.get("timestamp"),
        "received_at": now,
        "type": rec.get("type") or "text",
        "media_url": media.get("url"),
        "mimetype": media.get("mimetype"),
        "filename": media.get("filename"),
        "size": media.get("size"),
        "sha256": media.get("sha256"),
        "seconds": media.get("seconds"),
        "media_error": rec.get("media_error"),
        "quoted_id": rec.get("quoted_id"),
        "reaction": reaction.get("emoji"),
        "target_id": reaction.get("target_id") or rec.get("target_id"),
        "latitude": rec.get("latitude"),
        "longitude": rec.get("longitude"),
        "loc_name": rec.get("name"),
        "loc_address": rec.get("address"),
        "contact_name": contact.get("name"),
        "contact_vcard": contact.get("vcard"),
        "contact_phone": contact.get("phone"),
        "view_once": 1 if rec.get("view_once") else 0,
        "call_video": (1 if rec.get("video") else 0) if rec.get("type") == "call" else None,
        "call_rejected": (1 if rec.get("rejected") else 0) if rec.get("type") == "call" else None,
    }


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
        "error_code": row["error_code"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        # None: media queued without a type (the worker infers it from the bytes)
        "type": row["type"] or (None if row["media_url"] or row["media_sha256"] else "text"),
        "media_url": row["media_url"],
        "media_sha256": row["media_sha256"],
        "mimetype": row["mimetype"],
        "filename": row["filename"],
        "reply_to": row["reply_to"],
        "reaction": row["reaction"],
        "latitude": row["latitude"],
        "longitude": row["longitude"],
        "name": row["loc_name"],
        "address": row["loc_address"],
        "contact": ({"name": row["contact_name"], "phone": row["contact_phone"]}
                    if row["contact_name"] is not None or row["contact_phone"] is not None else None),
        "vcard": row["vcard"],
        "receipt": ({"status": row["receipt_status"], "at": row["receipt_at"], "by": row["receipt_by"]}
                    if row["receipt_status"] is not None else None),
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
        "type": row["type"],
        "media": ({"url": row["media_url"], "mimetype": row["mimetype"], "filename": row["filename"],
                   "size": row["size"], "sha256": row["sha256"], "seconds": row["seconds"]}
                  if row["media_url"] is not None or row["mimetype"] is not None or row["sha256"] is not None
                  else None),
        "media_error": row["media_error"],
        "quoted_id": row["quoted_id"],
        "reaction": ({"emoji": row["reaction"], "target_id": row["target_id"]}
                     if row["reaction"] is not None else None),
        "target_id": row["target_id"],
        "latitude": row["latitude"],
        "longitude": row["longitude"],
        "name": row["loc_name"],
        "address": row["loc_address"],
        "contact": ({"name": row["contact_name"], "vcard": row["contact_vcard"], "phone": row["contact_phone"]}
                    if row["contact_name"] is not None or row["contact_vcard"] is not None else None),
        "view_once": bool(row["view_once"]),
        "call": ({"video": bool(row["call_video"]), "rejected": bool(row["call_rejected"])}
                 if row["call_video"] is not None else None),
    }
