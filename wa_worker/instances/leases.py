"""Instance leases: which instances this worker may run, when the proxy has ``POST /leases``
(docs/proxy-contract.md, "Leases and fencing"; the state machine: docs/architecture.md).

One :class:`LeaseKeeper` per worker. Its first call is the probe: 404/405/501 means a proxy
without leases (single-worker mode: discovery and stored sessions, as always). Otherwise one
call every ``ttl_s / 3`` (at least 1 s) renews every lease held, gives back the stopped ones and
receives the complete set held afterwards: a new lease starts a runner (through the
:class:`LeaseHost`, the manager), a lease missing from the answer is lost and its runner stops at
once (disconnect, never logout; no status pushed), to be released on the next call once stopped.
Self-fencing: without a 2xx for ``ttl_s / 2`` (measured from the start of the last good call)
every leased runner stops and nothing is claimed until a renewal succeeds again. A 409
``lease_lost`` on an instance-scoped call loses that lease the same way. On SIGTERM, after the
graceful stop, :meth:`LeaseKeeper.release_all` gives back every stopped instance.

Hand-back: a release item lists in ``unsent`` the messages this worker claimed for the instance and
never began (journal ``claimed`` rows without an ``outbound`` row; asked only once its runner has
stopped, so nothing is in flight), and the proxy puts them back to queued: the next holder claims
them cleanly (no ``prior_claim``). A runner stopped under a lease still held (self-fencing) hands
its claims back the same way, in its ``held`` item, before it starts again.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Protocol

import anyio

from ..edge.client import EdgeClient, EdgeError, EndpointMissing
from ..edge.models import InstanceRef, Lease
from ..supervise import LoopHealth
from ..timing import Backoff, Clock

log = logging.getLogger("wa_worker.leases")

DEFAULT_TTL_S = 30.0
# a lost or fenced runner's close (CLOSE_TIMEOUT_S) plus a margin for a slow event loop
STOP_BUDGET_S = 15.0
# while the proxy keeps granting (a cold start, a failover, a fair share) the next call comes this soon:
# proxies grant a few per call (no reconnect storm), and waiting ttl/3 between those few is slow
RAMP_RENEW_S = 1.0
MIN_SEND_CAP_S = 5.0
MIN_RENEW_S = 1.0
PROBE_RETRY_CAP_S = 30.0
# hand-back of claims never begun: at most this many ids per instance and per call (a few hundred KB)
MAX_UNSENT_PER_INSTANCE = 1000
MAX_UNSENT_PER_CALL = 2000


class LeaseHost(Protocol):
    """What the keeper needs from the instance manager."""

    def apply_grant(self, ref: InstanceRef) -> None:
        """A new lease's discovery fields (settings, proxy_url, pair_phone): recorded, nothing started."""

    def start_leased(self, instance_id: str) -> bool:
        """Start the instance's runner (StartPacer and all, like a discovered instance); False if one runs."""

    def stop_unleased(self, instance_id: str) -> None:
        """Stop the runner at once: disconnect, never logout, no status pushed (the lease is not ours)."""

    def running(self, instance_id: str) -> bool:
        """A runner exists for the instance (starting, connected, or still stopping)."""

    def unsent_claims(self, instance_ids: list[str], limit_each: int) -> dict[str, list[str]]:
        """Messages claimed here for these instances (runners stopped) and never begun."""

    def withhold_claims(self, message_ids: list[str]) -> None:
        """About to hand these claims back: no longer this worker's own claims."""

    def settle_claims(self, requeued: list[str], kept: list[str]) -> None:
        """The proxy put ``requeued`` back to queued (forgotten) and kept ``kept`` (still ours)."""


class LeaseKeeper:
    """Holds this worker's leases; ``mode`` is None until the probe, then True (leases) or False."""

    def __init__(self, edge: EdgeClient, host: LeaseHost, *, worker_id: str, capacity: int, clock: Clock,
                 rng: random.Random | None = None, backoff_base_s: float = 1.0,
                 backoff_cap_s: float = PROBE_RETRY_CAP_S) -> None:
        self.edge = edge
        self.host = host
        self.worker_id = worker_id
        self.capacity = capacity
        self.clock = clock
        self.rng = rng or random.Random()
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.api_url: str | None = None  # API_PUBLIC_URL (with API_TOKEN): sent with every call
        self.mode: bool | None = None
        self.ttl_s = DEFAULT_TTL_S
        self.held: dict[str, int] = {}  # instance id -> current token
        self.priority: dict[str, int] = {}  # of the held leases, from their grant (start order)
        self.releasing: dict[str, int] = {}  # lost or ended: released on the next call once the runner stopped
        # held leases whose runner stopped (self-fencing): their unsent claims are handed back (in the held
        # item) before the runner starts again
        self.handing_back: set[str] = set()
        self.handed_back_at: dict[str, float] = {}  # held instance -> clock.monotonic() of its last hand-back call
        self.fenced = False
        self.closed = False  # the final release was sent: no more calls
        self.unconfirmed = False  # single-worker mode by memory (the probe was not answered)
        self.last_ok: float | None = None  # clock.monotonic() at the start of the last 2xx
        self.counts: Counter[str] = Counter()  # granted, lost, revoked_409, fenced, renewals, failures, released
        self.last_granted = 0  # new leases in the last answer
        self.health = LoopHealth("leases", clock, stale_after_s=3 * (DEFAULT_TTL_S / 3 + edge.timeout_s))
        self._wake = anyio.Event()
        self._lock = anyio.Lock()

    # ------------------------------------------------------------------ queries

    @property
    def interval_s(self) -> float:
        return max(MIN_RENEW_S, self.ttl_s / 3)

    def token_of(self, instance_id: str) -> int | None:
        """The token instance-scoped calls carry: the current lease, else the lost one (a stopping
        runner's last calls are refused with it, never sent without a token)."""
        token = self.held.get(instance_id)
        return token if token is not None else self.releasing.get(instance_id)

    def may_claim(self, instance_id: str) -> bool:
        """Leases on: only a held lease, never while fenced. Without leases: always."""
        if not self.mode:
            return True
        return not self.check_fence() and instance_id in self.held

    def handed_back_since(self, instance_id: str, asked_at: float) -> bool:
        """The instance's claims were handed back under its current lease at or after ``asked_at``: a
        claim asked for before then (a batch poll in flight) may name a message the proxy put back
        to queued, so it must not be sent from that answer."""
        at = self.handed_back_at.get(instance_id)
        return at is not None and at >= asked_at

    def check_fence(self) -> bool:
        """Whether this worker is fenced now, by the clock: a process frozen past the fencing
        deadline (SIGSTOP, a VM pause) fences itself at its first claim after it resumes, not
        only when the renewal loop next wakes (which it then does at once, to renew)."""
        if self.mode and not self.fenced:
            self._check_fence()
            if self.fenced:
                self._wake.set()
        return self.fenced

    def send_cap_s(self) -> float | None:
        """With leases, the longest a send (upload included) may hold the session open: a send that
        began just before self-fencing (``ttl/2``) and the runner's close (``STOP_BUDGET_S``) must end
        before the lease can be granted elsewhere (``2 × ttl``). None without leases."""
        if not self.mode:
            return None
        return max(MIN_SEND_CAP_S, 1.5 * self.ttl_s - STOP_BUDGET_S)

    def describe(self) -> dict[str, object]:
        """For /health: counts only (no ids, not even the worker's)."""
        return {"mode": {None: "probing", True: "leases", False: "single-worker"}[self.mode],
                "held": len(self.held), "fenced": self.fenced,
                "ttl_s": self.ttl_s, **dict(self.counts)}

    # ------------------------------------------------------------------ events

    def wake(self) -> None:
        """Renew now (e.g. a push channel's ``leases`` event, a /wake for an unknown instance)."""
        self._wake.set()

    def lost_by_fencing(self, instance_id: str, token: int) -> None:
        """The edge client got 409 ``lease_lost`` for ``token``: lost, if it is still the current one."""
        if self.held.get(instance_id) != token:
            return  # an older token (already lost, or re-granted since): nothing to stop
        self.counts["revoked_409"] += 1
        log.warning("%s: the proxy refused lease token %d (409 lease_lost): stopping it here (no logout)",
                    instance_id, token, extra={"instance_id": instance_id})
        self._lose(instance_id)

    def runner_ended(self, instance_id: str, gone: bool = False) -> None:
        """A runner ended (stopped, logged out, gone). A lost lease can now be released; a lease still
        held whose runner logged out starts again (a fresh QR); one the proxy no longer knows is given back."""
        if not self.mode:
            return
        if gone and instance_id in self.held:
            self.releasing[instance_id] = self.held.pop(instance_id)
        if instance_id in self.releasing or instance_id in self.handing_back:
            self._wake.set()  # released (or its claims handed back, then started) by the next call
        elif instance_id in self.held and not self.fenced:
            self.host.start_leased(instance_id)

    # ------------------------------------------------------------------ calls

    async def probe(self, stop: anyio.Event, *, known_without: bool = False) -> bool:
        """The first call, retried until the proxy answers (or ``stop``): True when it has leases
        (the leases it granted are started), False for 404/405/501 or another refusal.
        ``known_without``: the proxy had no leases at this worker's last start; if it does not answer
        now, single-worker mode at once (stored sessions resume during an outage, as always) and
        ``unconfirmed`` is set (:meth:`confirm` asks again in the background)."""
        backoff = Backoff(self.backoff_base_s, self.backoff_cap_s, rng=self.rng)
        while not stop.is_set():
            try:
                await self._renew()
            except EndpointMissing:
                self.mode = False
                self.health.finished = True
                log.info("the proxy has no POST /leases: single-worker mode (discovery and stored sessions)")
                return False
            except EdgeError as exc:
                if not exc.transient:
                    self.mode = False
                    self.health.finished = True
                    log.warning("POST /leases refused (%s): single-worker mode", exc)
                    return False
                if known_without:
                    self.mode = False
                    self.unconfirmed = True
                    self.health.finished = True
                    log.warning("POST /leases not answered (%s); the proxy had no leases at the last start: "
                                "single-worker mode now, asked again in the background", exc)
                    return False
                delay = max(backoff.next_delay(), exc.retry_after_s or 0.0)
                log.warning("POST /leases not answered (%s): nothing is resumed until the proxy says whether it "
                            "has leases; again in %.1fs", exc, delay)
                await self.clock.wait(stop, delay)
                continue
            self.mode = True
            self.edge.enable_leases(self.worker_id, self.token_of)
            self.edge.on_lease_lost = self.lost_by_fencing
            log.info("the proxy has leases: worker %s, capacity %d, ttl %gs, %d lease(s) granted",
                     self.worker_id, self.capacity, self.ttl_s, len(self.held))
            self._start_missing()
            return True
        return False

    async def confirm(self, stop: anyio.Event) -> bool:
        """After a probe that was not answered (``unconfirmed``): ask until the proxy answers, with
        ``capacity: 0`` (nothing can be granted). True when it now has leases (the caller restarts
        the worker into lease mode), False when it still has none."""
        backoff = Backoff(self.backoff_base_s, self.backoff_cap_s, rng=self.rng)
        while not stop.is_set():
            try:
                await self.edge.leases(self.worker_id, 0, {}, {})
            except EndpointMissing:
                self.unconfirmed = False
                return False
            except EdgeError as exc:
                if not exc.transient:
                    self.unconfirmed = False
                    return False
                await self.clock.wait(stop, max(backoff.next_delay(), exc.retry_after_s or 0.0))
                continue
            self.unconfirmed = False
            log.error("the proxy has leases now, and this worker started without them: restarting into lease mode")
            return True
        return False

    async def run(self) -> None:
        """The renewal loop (under ``supervise.forever``), once :meth:`probe` said leases are on."""
        while not self.closed:
            self._wake = anyio.Event()
            self._start_missing()
            wait = self.interval_s
            remaining = self._fence_remaining()
            # a call that hangs must not delay self-fencing: cut it at the fencing deadline
            cut = None if self.fenced or remaining is None else min(self.edge.timeout_s, max(0.05, remaining))
            try:
                with anyio.fail_after(cut):
                    await self._renew()
            except (EdgeError, TimeoutError) as exc:
                self.counts["failures"] += 1
                if isinstance(exc, EdgeError) and exc.retry_after_s:
                    wait = max(wait, exc.retry_after_s)
                log.debug("lease renewal failed: %s", exc)
            self._check_fence()
            if self.last_granted and len(self.held) < self.capacity and not self.fenced:
                wait = min(wait, RAMP_RENEW_S)  # more may be waiting for a worker
            remaining = self._fence_remaining()
            if remaining is not None and not self.fenced:
                wait = min(wait, remaining)  # wake at the fencing deadline
            self.health.ok()
            await self.clock.wait(self._wake, wait)

    async def release_all(self, timeout_s: float) -> int:
        """SIGTERM, after the graceful stop: one last call, ``held: []``, ``capacity: 0`` (so that
        nothing is granted in its answer) and every stopped instance in ``release`` (a runner still
        running is left to expire). Bounded; never raises."""
        if not self.mode or self.closed:
            return 0
        release = {i: t for i, t in {**self.releasing, **self.held}.items() if not self.host.running(i)}
        with anyio.move_on_after(timeout_s):
            async with self._lock:
                self.closed = True
                unsent = self._unsent(list(release))
                try:
                    _, _, requeued = await self.edge.leases(self.worker_id, 0, {}, release, unsent=unsent)
                except EdgeError as exc:
                    log.warning("could not release %d lease(s) at shutdown (%s): they expire after %gs",
                                len(release), exc, self.ttl_s)
                    return 0
                self._settle(unsent, requeued)
                self.counts["released"] += len(release)
                log.info("released %d lease(s) at shutdown", len(release))
                return len(release)
        self.closed = True
        log.warning("releasing %d lease(s) at shutdown took longer than %gs: they expire after %gs",
                    len(release), timeout_s, self.ttl_s)
        return 0

    async def _renew(self) -> None:
        async with self._lock:
            if self.closed:
                return
            release = dict(self.releasing)
            for iid in [i for i in release if self.host.running(i)]:
                del release[iid]  # still stopping: released once stopped
            self.handing_back &= set(self.held)
            back = [i for i in self.handing_back if not self.host.running(i)]
            unsent = self._unsent([*release, *back])
            started = self.clock.monotonic()
            self.handed_back_at = {i: t for i, t in self.handed_back_at.items() if i in self.held}
            for iid in back:
                if iid in unsent:
                    self.handed_back_at[iid] = started
            self.counts["renewals"] += 1
            ttl, leases, requeued = await self.edge.leases(self.worker_id, self.capacity, dict(self.held), release,
                                                           api_url=self.api_url, unsent=unsent)
            self.handing_back.difference_update(back)  # asked once: what the proxy did not take back waits
            self._settle(unsent, requeued)
            self.last_ok = started
            self.ttl_s = ttl
            self.health.stale_after_s = 3 * (self.interval_s + self.edge.timeout_s)
            for iid, token in release.items():
                if self.releasing.get(iid) == token:
                    del self.releasing[iid]
            if self.fenced:
                self.fenced = False
                log.warning("lease renewal succeeded again: no longer fenced, starting %d leased instance(s)",
                            len(leases))
            self._apply(leases)

    def _apply(self, leases: list[Lease]) -> None:
        """The proxy's complete set: what is missing is lost, what is new is recorded (started by
        :meth:`_start_missing`)."""
        answer = {lease.instance_id: lease.token for lease in leases}
        self.last_granted = sum(1 for iid in answer if iid not in self.held)
        for iid, token in list(self.held.items()):
            if iid not in answer:
                log.warning("%s: lease %d not renewed by the proxy (moved or revoked): stopping it here (no logout)",
                            iid, token, extra={"instance_id": iid})
                self._lose(iid)
        for lease in leases:
            if self.held.get(lease.instance_id) != lease.token:
                if lease.instance_id not in self.held:
                    self.counts["granted"] += 1
                self.held[lease.instance_id] = lease.token
            if lease.ref is not None:
                self.priority[lease.instance_id] = lease.ref.priority
                self.host.apply_grant(lease.ref)
        if self.mode:
            self._start_missing()

    def _unsent(self, instance_ids: list[str]) -> dict[str, list[str]]:
        """The claims to hand back with these (stopped) instances, bounded per instance and per call;
        withheld from now on (no longer counted as this worker's own, whatever becomes of the call)."""
        if not instance_ids:
            return {}
        found = self.host.unsent_claims(instance_ids, MAX_UNSENT_PER_INSTANCE)
        out: dict[str, list[str]] = {}
        room = MAX_UNSENT_PER_CALL
        for iid in sorted(found):
            ids = found[iid][:room]
            if ids:
                out[iid] = ids
                room -= len(ids)
        if out:
            self.host.withhold_claims([m for ids in out.values() for m in ids])
        return out

    def _settle(self, unsent: dict[str, list[str]], requeued: list[str] | None) -> None:
        """After an answered call: forget what the proxy put back to queued; the rest (all of it with a
        proxy that does not answer ``requeued``) stays this worker's claims, as before."""
        if not unsent:
            return
        listed = [m for ids in unsent.values() for m in ids]
        back = set(requeued or ()) & set(listed)
        kept = [m for m in listed if m not in back]
        self.host.settle_claims(sorted(back), kept)
        if back:
            self.counts["unsent_requeued"] += len(back)
        if kept and requeued is not None:
            self.counts["unsent_refused"] += len(kept)
        log.info("handed back %d claimed message(s) never begun (%d put back to queued, %d not taken back%s)",
                 len(listed), len(back), len(kept), "" if requeued is not None else ": the proxy does not say")

    def _lose(self, instance_id: str) -> None:
        self.handing_back.discard(instance_id)
        token = self.held.pop(instance_id, None)
        self.priority.pop(instance_id, None)
        if token is None:
            return
        self.counts["lost"] += 1
        self.releasing[instance_id] = token
        self.host.stop_unleased(instance_id)
        self._wake.set()

    def _start_missing(self) -> None:
        """Every held lease without a runner gets one (highest priority first), unless fenced."""
        if self.fenced or not self.mode:
            return
        waiting = [i for i in self.held if not self.host.running(i) and i not in self.handing_back]
        for iid in sorted(waiting, key=lambda i: -self.priority.get(i, 0)):
            self.host.start_leased(iid)

    def _fence_remaining(self) -> float | None:
        if self.last_ok is None:
            return None
        return self.ttl_s / 2 - (self.clock.monotonic() - self.last_ok)

    def _check_fence(self) -> None:
        remaining = self._fence_remaining()
        if self.fenced or remaining is None or remaining > 0:
            return
        self.fenced = True
        self.counts["fenced"] += 1
        log.error("no lease renewal for %gs (ttl %gs): self-fencing, stopping %d leased instance(s) (no logout) "
                  "until a renewal succeeds", self.ttl_s / 2, self.ttl_s, len(self.held))
        for iid in list(self.held):
            if self.host.running(iid):
                self.host.stop_unleased(iid)
                self.handing_back.add(iid)
