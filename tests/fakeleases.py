"""The lease rules of docs/proxy-contract.md ("Leases and fencing") for :class:`tests.fakeproxy.FakeProxy`.

Pure bookkeeping on an injectable monotonic clock: grants only of free leases (never held,
released, or expired for at least one more TTL), a token per grant (monotonic per instance),
fair share (``ceil(instances / live workers)``, at most ``grants_per_call`` per call, highest
priority first), revocation above ``target + 1``, releases with the current token only,
the claim tokens of messages (``prior_claim`` when another token claimed one before), and the hand-back
of claims never begun (an item's ``unsent``: put back to queued when still claimed under the caller's token).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LeaseRow:
    token: int = 0
    holder: str | None = None
    expires_at: float = 0.0
    free_at: float = 0.0  # a released or expired lease may be granted from then on
    revoked: bool = False  # left out of the holder's answers: not renewed any more


@dataclass
class LeaseBook:
    ttl_s: float = 30.0
    grants_per_call: int = 5
    clock: Callable[[], float] = time.monotonic
    rows: dict[str, LeaseRow] = field(default_factory=dict)
    workers: dict[str, float] = field(default_factory=dict)  # worker id -> its last /leases call
    api_urls: dict[str, str | None] = field(default_factory=dict)  # worker id -> api_url of its last call
    events: list[tuple[float, str, str, str, int]] = field(default_factory=list)  # (at, kind, iid, worker, token)
    claim_token: dict[str, int] = field(default_factory=dict)  # message id -> token it was last claimed under
    claim_iid: dict[str, str] = field(default_factory=dict)  # message id -> instance it was claimed for
    requeued: list[tuple[str, str, int]] = field(default_factory=list)  # (message id, worker, token) handed back
    unsent_ignored: int = 0  # handed-back ids not claimed under the caller's token (stale, foreign, unknown)
    hand_back: bool = True  # False: a proxy from before ``unsent`` (ignores it, answers no ``requeued``)
    refused: Counter[str] = field(default_factory=Counter)  # endpoint -> 409 lease_lost answers

    # ------------------------------------------------------------------ queries

    def current(self, iid: str) -> tuple[str, int] | None:
        """(holder, token) of a lease held and not expired now; None otherwise."""
        row = self.rows.get(iid)
        if row is None or row.holder is None or self.clock() > row.expires_at:
            return None
        return row.holder, row.token

    def holder_of(self, iid: str) -> str | None:
        cur = self.current(iid)
        return cur[0] if cur else None

    def valid(self, iid: str, token: Any) -> bool:
        """The fencing check of instance-scoped calls: the token of a lease held now."""
        cur = self.current(iid)
        return cur is not None and token == cur[1]

    def holder(self, iid: str) -> dict[str, Any] | None:
        """``GET /lease-holder``'s answer: a live lease not revoked, with its holder's api_url."""
        cur = self.current(iid)
        if cur is None or self.rows[iid].revoked:
            return None
        return {"instanceId": iid, "worker_id": cur[0], "api_url": self.api_urls.get(cur[0])}

    def held_by(self, worker: str) -> list[str]:
        return sorted(i for i in self.rows if self.holder_of(i) == worker)

    # ------------------------------------------------------------------ POST /leases

    # long: one call's rules in the contract's order (release, renew, revoke, grant), each a few lines
    def call(self, body: dict[str, Any], needing: dict[str, int],
             item_of: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
        """One ``POST /leases``; ``needing``: instance id -> priority of every instance that needs a worker."""
        now = self.clock()
        wid = body["worker_id"]
        capacity = int(body["capacity"])
        self.workers[wid] = now
        self.api_urls[wid] = body.get("api_url")
        requeued = self._hand_back(wid, [*body.get("held", []), *body.get("release", [])])
        for item in body.get("release", []):
            row = self.rows.get(item["instanceId"])
            if row is not None and row.holder == wid and row.token == item["token"]:
                row.holder, row.free_at, row.revoked = None, now, False
                self.events.append((now, "release", item["instanceId"], wid, row.token))
        answer: list[dict[str, Any]] = []
        for item in body.get("held", []):
            iid = item["instanceId"]
            row = self.rows.get(iid)
            if row is None or row.holder != wid or row.token != item["token"] or row.revoked:
                continue
            if now > row.expires_at:  # expired: lost (free once the grace has passed)
                continue
            row.expires_at = now + self.ttl_s
            answer.append({"instanceId": iid, "token": row.token})
        self._expire(now)
        live = [w for w, at in self.workers.items() if now - at <= self.ttl_s]
        target = math.ceil(len(needing) / max(1, len(live)))
        mine = [a["instanceId"] for a in answer]
        if len(mine) > target + 1:
            lowest = sorted(mine, key=lambda i: needing.get(i, 0))[:min(self.grants_per_call, len(mine) - target)]
            for iid in lowest:
                self.rows[iid].revoked = True
                self.events.append((now, "revoke", iid, wid, self.rows[iid].token))
            answer = [a for a in answer if a["instanceId"] not in lowest]
            mine = [a["instanceId"] for a in answer]
        room = min(capacity, target) - len(mine)
        # free ones, and this worker's own leases it did not list (it restarted without knowing them:
        # same worker id, new process): given back at once under a new token
        listed = {item["instanceId"] for item in [*body.get("held", []), *body.get("release", [])]}
        free = [i for i in needing if self._free(i, now) or (self.rows[i].holder == wid and not self.rows[i].revoked
                                                               and i not in listed)]
        for iid in sorted(free, key=lambda i: -needing[i])[:max(0, min(room, self.grants_per_call))]:
            row = self.rows.setdefault(iid, LeaseRow())
            row.token += 1
            row.holder, row.expires_at, row.revoked = wid, now + self.ttl_s, False
            self.events.append((now, "grant", iid, wid, row.token))
            answer.append({"instanceId": iid, "token": row.token, "priority": needing[iid], "settings": None,
                           "proxy_url": None, "pair_phone": None, **item_of(iid)})
        extra = {} if requeued is None else {"requeued": requeued[0], "unsent_ignored": requeued[1]}
        return {"ttl_s": self.ttl_s, "leases": answer, **extra}

    def _hand_back(self, wid: str, items: list[dict[str, Any]]) -> tuple[list[str], int] | None:
        """Items' ``unsent`` (before releases): back to queued when the item's token is the caller's
        lease now and the message is still claimed under it for that instance; None: no item had any."""
        if not self.hand_back or not any("unsent" in item for item in items):
            return None
        back: list[str] = []
        ignored = 0
        for item in items:
            iid, token = item["instanceId"], item["token"]
            row = self.rows.get(iid)
            ours = row is not None and row.holder == wid and row.token == token
            for mid in item.get("unsent", []):
                if ours and self.claim_token.get(mid) == token and self.claim_iid.get(mid) == iid:
                    del self.claim_token[mid]
                    self.claim_iid.pop(mid, None)
                    self.requeued.append((mid, wid, token))
                    back.append(mid)
                else:
                    ignored += 1
        self.unsent_ignored += ignored
        return back, ignored

    def _expire(self, now: float) -> None:
        for iid, row in self.rows.items():
            if row.holder is not None and now > row.expires_at:
                self.events.append((now, "expire", iid, row.holder, row.token))
                row.holder, row.free_at, row.revoked = None, row.expires_at + self.ttl_s, False

    def _free(self, iid: str, now: float) -> bool:
        row = self.rows.get(iid)
        if row is None:
            return True
        if row.holder is not None:
            return False
        return now >= row.free_at

    # ------------------------------------------------------------------ claims

    def claim(self, mid: str, token: int, iid: str | None = None) -> bool:
        """Record that ``mid`` (of ``iid``) is handed out under ``token``; True when another token claimed
        it before (``prior_claim``)."""
        before = self.claim_token.get(mid)
        self.claim_token[mid] = token
        if iid is not None:
            self.claim_iid[mid] = iid
        return before is not None and before != token

    def claimable(self, iid: str, mid: str) -> bool:
        """Not claimed, or claimed under a token that is no longer the instance's current one (stale)."""
        before = self.claim_token.get(mid)
        cur = self.current(iid)
        return before is None or cur is None or before != cur[1]

    def ack_allowed(self, mid: str, token: Any) -> bool:
        """An acknowledgement with the message's claim token (or none: a worker without leases)."""
        return token is None or token == self.claim_token.get(mid)
