"""The dev proxy's lease rules (docs/proxy-contract.md, "Leases and fencing"), over
the :class:`~wa_worker.dev.store.DevStore`'s connection.

:func:`lease_call` is one ``POST /leases``; the store runs it inside one
``BEGIN IMMEDIATE`` transaction under its lock, so two workers calling at once
are serialized and never both get one instance.

Per instance: ``lease_token`` (monotonic, bumped by each grant, never reused),
``lease_holder`` (NULL: free), ``lease_expires_at``, ``lease_revoked`` (left out
of its holder's answer; free once released, or one TTL after it expires).
Per worker: ``workers`` (capacity, last call, the ``api_url`` it gave: ``GET /lease-holder``);
live = called within the TTL.

Hand-back: an item's ``unsent`` ids (claims its worker never began) go back to ``queued``, their
claim cleared, when the item's token is the instance's lease held by the caller (checked before this
call's releases) and the message is still ``sending`` under that token for that instance; any other
id is ignored and counted.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from dataclasses import dataclass, field
from typing import Any

WORKER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
LEASE_GRANTS_PER_CALL = 5
LEASE_REVOKES_PER_CALL = 5

# free: never held, released, or expired for at least one more TTL (the grace for self-fencing)
_FREE = "(lease_holder IS NULL OR lease_expires_at + :ttl < :now)"


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    worker_id: str
    capacity: int
    held: tuple[tuple[str, int], ...] = ()
    release: tuple[tuple[str, int], ...] = ()
    api_url: str | None = None  # where API clients reach this worker (GET /lease-holder)
    unsent: tuple[tuple[str, int, tuple[str, ...]], ...] = ()  # (instance, token, message ids) of held/release


@dataclass(slots=True)
class LeaseAnswer:
    """``leases`` as answered; the rest says what changed (for events and the terminal)."""

    leases: list[dict[str, Any]]
    granted: list[str] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    # when the call released leases or came from a new worker: the other live workers
    # whose next call would get a grant or a revocation
    notify: list[str] = field(default_factory=list)
    # the hand-back (None: no item listed unsent): (message id, instance id) put back to queued, ids ignored
    requeued: list[tuple[str, str]] | None = None
    unsent_ignored: int = 0


def lease_call(db: sqlite3.Connection, req: LeaseRequest, now: float, ttl: float) -> LeaseAnswer:
    """One ``POST /leases`` (the caller holds the transaction)."""
    p = {"w": req.worker_id, "now": now, "ttl": ttl}
    requeued, ignored = _hand_back(db, req, now)
    released = _release(db, req)
    db.execute("DELETE FROM workers WHERE last_seen < :now - :ttl", p)
    mine = db.execute(
        "SELECT id, lease_token, priority, settings, proxy_url, pair_phone FROM instances "
        "WHERE lease_holder = :w AND lease_revoked = 0 ORDER BY priority DESC, created_at, id", p).fetchall()
    if not mine and not req.held and req.release:
        # a worker leaving (its last call, after SIGTERM): not counted in the fair share,
        # so the others take its instances over at once instead of one TTL later
        db.execute("DELETE FROM workers WHERE id = :w", p)
        return LeaseAnswer([], released=released, notify=_notices(db, None, now, ttl), requeued=requeued,
                           unsent_ignored=ignored)
    arrived = db.execute("SELECT 1 FROM workers WHERE id = :w", p).fetchone() is None
    db.execute(
        "INSERT INTO workers (id, capacity, last_seen, api_url) VALUES (:w, :cap, :now, :url) "
        "ON CONFLICT (id) DO UPDATE SET capacity = excluded.capacity, last_seen = excluded.last_seen, "
        "api_url = excluded.api_url",
        {**p, "cap": req.capacity, "url": req.api_url})
    db.execute("UPDATE instances SET lease_expires_at = :now + :ttl WHERE lease_holder = :w AND lease_revoked = 0", p)
    target = _target(db)
    limit = min(req.capacity, target)
    answer = LeaseAnswer([], released=released, requeued=requeued, unsent_ignored=ignored)
    held = dict(req.held)
    kept = list(mine)
    if len(mine) > target + 1 or len(mine) > req.capacity:
        cut = min(LEASE_REVOKES_PER_CALL, len(mine) - limit)
        kept, dropped = mine[:len(mine) - cut], mine[len(mine) - cut:]  # mine is highest priority first
        db.executemany("UPDATE instances SET lease_revoked = 1 WHERE id = ?", [(r["id"],) for r in dropped])
        answer.revoked = [r["id"] for r in dropped]
    for r in kept:
        # held with its current token: renewed; otherwise (an answer the worker never
        # read, a restart with the same WORKER_ID) sent again as a grant, with its fields
        renewed = held.get(r["id"]) == r["lease_token"]
        answer.leases.append({"instanceId": r["id"], "token": r["lease_token"]} if renewed else _grant_item(r))
    room = min(LEASE_GRANTS_PER_CALL, limit - len(mine)) if not answer.revoked else 0
    if room > 0:
        free = db.execute(f"SELECT id FROM instances WHERE {_FREE} ORDER BY priority DESC, created_at, id "
                          "LIMIT :n", {**p, "n": room}).fetchall()
        for (iid,) in free:
            row = db.execute(
                "UPDATE instances SET lease_token = lease_token + 1, lease_holder = :w, lease_expires_at = :now + :ttl, "
                f"lease_revoked = 0 WHERE id = :id AND {_FREE} "
                "RETURNING id, lease_token, priority, settings, proxy_url, pair_phone", {**p, "id": iid}).fetchone()
            if row is None:  # cannot happen inside the transaction; never grant a lease that is not free
                continue
            answer.leases.append(_grant_item(row))
            answer.granted.append(iid)
    if arrived or released:  # the share changed for the others (not for each renewal: no storm of calls)
        answer.notify = _notices(db, req.worker_id, now, ttl)
    return answer


def _hand_back(db: sqlite3.Connection, req: LeaseRequest, now: float) -> tuple[list[tuple[str, str]] | None, int]:
    """The items' ``unsent`` back to queued (before the releases: the lease must still be the caller's
    under that token); returns what went back (None: nothing was listed) and how many were ignored."""
    if not req.unsent:
        return None, 0
    back: list[tuple[str, str]] = []
    ignored = 0
    for iid, token, ids in req.unsent:
        ours = db.execute("SELECT 1 FROM instances WHERE id = ? AND lease_token = ? AND lease_holder = ?",
                          (iid, token, req.worker_id)).fetchone() is not None
        for mid in ids:
            row = db.execute(
                "UPDATE outbound SET status = 'queued', claimed_at = NULL, claim_token = NULL, updated_at = ? "
                "WHERE id = ? AND instance_id = ? AND status = 'sending' AND claim_token = ? RETURNING id",
                (now, mid, iid, token)).fetchone() if ours else None
            if row is None:
                ignored += 1
            else:
                back.append((mid, iid))
    return back, ignored


def _release(db: sqlite3.Connection, req: LeaseRequest) -> list[str]:
    """Free the leases released with their current token (an old token is ignored)."""
    out = []
    for iid, token in req.release:
        cur = db.execute(
            "UPDATE instances SET lease_holder = NULL, lease_expires_at = NULL, lease_revoked = 0 "
            "WHERE id = ? AND lease_token = ? AND lease_holder = ?", (iid, token, req.worker_id))
        if cur.rowcount:
            out.append(iid)
    return out


def _target(db: sqlite3.Connection) -> int:
    """The fair share: ``ceil(instances needing a worker / live workers)`` (every dev instance
    needs one), water-filled over capacities: what a worker of small capacity cannot take is
    shared by the others (else those instances would never be served)."""
    remaining = int(db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])
    caps = sorted(int(r[0]) for r in db.execute("SELECT capacity FROM workers"))
    for i, cap in enumerate(caps):
        share = math.ceil(remaining / (len(caps) - i))
        if cap >= share:
            return share
        remaining -= cap
    return max(caps[-1] if caps else 0, remaining, 1)


def _notices(db: sqlite3.Connection, caller: str | None, now: float, ttl: float) -> list[str]:
    """Live workers (other than ``caller``) whose next call would get a grant or a revocation."""
    target = _target(db)
    free = int(db.execute(f"SELECT COUNT(*) FROM instances WHERE {_FREE}", {"now": now, "ttl": ttl}).fetchone()[0])
    rows = db.execute(
        "SELECT w.id, w.capacity, (SELECT COUNT(*) FROM instances i WHERE i.lease_holder = w.id "
        "AND i.lease_revoked = 0) AS held FROM workers w WHERE w.id IS NOT :caller ORDER BY w.id",
        {"caller": caller}).fetchall()
    out = []
    for r in rows:
        held, cap = int(r["held"]), int(r["capacity"])
        if held > target + 1 or held > cap or (free > 0 and held < min(cap, target)):
            out.append(str(r["id"]))
    return out


def lease_notices(db: sqlite3.Connection, now: float, ttl: float) -> list[str]:
    """Live workers that would get a grant or a revocation now (e.g. after an instance was added)."""
    db.execute("DELETE FROM workers WHERE last_seen < :now - :ttl", {"now": now, "ttl": ttl})
    return _notices(db, None, now, ttl)


def _grant_item(row: sqlite3.Row) -> dict[str, Any]:
    """A granted lease with the discovery item's fields (priority, settings, proxy_url, pair_phone)."""
    return {"instanceId": row["id"], "token": row["lease_token"], "priority": row["priority"],
            "settings": json.loads(row["settings"]) if row["settings"] else None,
            "proxy_url": row["proxy_url"], "pair_phone": row["pair_phone"]}
