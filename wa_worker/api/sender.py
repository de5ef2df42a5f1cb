"""Messages sent through the direct API: idempotency keys, the send jobs, their outcomes.

A request's journal id is ``api:<instance>:<Idempotency-Key>``; the journal
row has ``origin`` ``api`` (never acknowledged to the proxy). The key is
remembered (``api_requests``: the hash of the body) *before* anything is done,
so a repeat with another body is a conflict, and the send itself goes through
:meth:`~wa_worker.relays.outbound.OutboundRelay.send_one` (same checks, number
resolution, pacing, media limits and journal as a polled message, under the
instance's send lock). An outcome is, in order of precedence:

* the journal's outbound row: ``sent`` (``wa_message_id``), ``failed``
  (``error_code``; final), or ``pending`` while it is ``sending``;
* ``pending`` while a job of this process handles it;
* ``not_sent`` (with a code) when it ended before reaching WhatsApp: the send
  caps or number lookups kept it waiting too long, the instance disconnected,
  or the worker stopped or died first (``interrupted``). Nothing was sent: the
  same request with the same key runs again.

Jobs run in :meth:`ApiSender.run`'s task group (the worker owns it), at most
:data:`MAX_JOBS` at once; a request waits up to ``wait_s`` for its outcome and
is otherwise answered ``pending`` (the job goes on).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import anyio

from ..backends.base import Session
from ..edge.models import QueuedMessage, parse_messages
from ..instances.runner import InstanceSnapshot
from ..relays.outbound import Deferred, OutboundRelay
from ..storage.journal import Journal, JournalUnavailable
from ..timing import Clock
from .models import MessageOutcome, SendMessage

log = logging.getLogger("wa_worker.api")

MAX_JOBS = 1024
# a job whose message must wait (send caps, number lookups, a disk recovering) keeps trying this long
MAX_DEFER_S = 120.0
MIN_RETRY_S = 0.5


class Instances(Protocol):
    """What the API reads of the instances this worker holds (the manager is one)."""

    def snapshot(self, instance_id: str) -> InstanceSnapshot | None: ...

    def snapshots(self) -> list[InstanceSnapshot]: ...

    def session(self, instance_id: str) -> Session | None: ...


class Refused(Exception):
    """A send request answered without a job: ``status`` and ``code`` for the error body."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


def journal_id(instance_id: str, key: str) -> str:
    """The journal id of an API request (instance ids hold no ':', so it parses back)."""
    return f"api:{instance_id}:{key}"


def body_hash(message: SendMessage) -> str:
    """The hash of what a request asks for (whitespace and key order do not matter)."""
    canonical = json.dumps(message.model_dump(exclude_none=True), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class _Job:
    message_id: str
    instance_id: str
    key: str
    body_sha256: str
    message: QueuedMessage
    done: anyio.Event = field(default_factory=anyio.Event)
    not_sent: tuple[str, str, float | None] | None = None  # (code, error, retry_after_s) kept in memory too


class ApiSender:
    """Runs the direct API's send jobs and answers what became of each key."""

    def __init__(self, instances: Instances, relay: OutboundRelay, journal: Journal, *, clock: Clock | None = None,
                 wait_s: float = 10.0) -> None:
        self.instances = instances
        self.relay = relay
        self.journal = journal
        self.clock = clock or Clock()
        self.wait_s = wait_s
        self._jobs: dict[str, _Job] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self.accepted = 0
        self.replays = 0

    async def run(self) -> None:
        """Own the jobs until cancelled (a stop cancels a job's wait or media fetch, never a send in flight)."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                await anyio.sleep_forever()
            finally:
                self._tg = None

    # ------------------------------------------------------------------ sending

    async def submit(self, instance_id: str, key: str, message: SendMessage) -> tuple[MessageOutcome, bool]:
        """Send ``message`` once for ``key`` (or find what became of it); returns its outcome
        after at most ``wait_s`` and whether this request started the send. Raises
        :class:`Refused` (conflict, not connected, busy) or :class:`JournalUnavailable`."""
        mid = journal_id(instance_id, key)
        digest = body_hash(message)
        job = self._jobs.get(mid)
        started = False
        if job is not None:
            if job.body_sha256 != digest:
                raise _conflict()
            self.replays += 1
        else:
            job, started = self._start(instance_id, key, mid, digest, message)
            if job is None:
                self.replays += 1
                return self.outcome(instance_id, key), False
        with anyio.move_on_after(self.wait_s):
            await job.done.wait()
        return self.outcome(instance_id, key, job), started

    def _start(self, instance_id: str, key: str, mid: str, digest: str,
               message: SendMessage) -> tuple[_Job | None, bool]:
        """A new job for ``mid``, or (None, False) when the journal already has its outcome.
        No await in here: two requests with one key never both start."""
        known = self.journal.api_request(mid)
        row = self.journal.outbound_get(mid)
        if row is not None and row.origin != "api":
            raise Refused(409, "idempotency_conflict", "this key is the id of a message the proxy queued: "
                                                       "use another Idempotency-Key")
        if known is not None:
            if known.body_sha256 != digest:
                raise _conflict()
            if row is not None:
                return None, False  # handled before (or sending): its outcome is in the journal
        if self.instances.session(instance_id) is None:
            raise Refused(409, "instance_not_connected", f"instance {instance_id} is not connected to WhatsApp now "
                                                         "(GET /api/instances/{id} says why); nothing was sent")
        if self._tg is None:
            raise Refused(503, "unavailable", "the worker is starting or stopping", 1.0)
        if len(self._jobs) >= MAX_JOBS:
            raise Refused(503, "too_many_pending", f"{MAX_JOBS} API sends are in progress: try again shortly", 5.0)
        queued = _queued(mid, instance_id, message)
        if known is None:
            self.journal.api_request_add(mid, instance_id, key, digest)
        else:
            self.journal.api_request_not_sent(mid, None)  # it never reached WhatsApp: it runs again
        job = _Job(mid, instance_id, key, digest, queued)
        self._jobs[mid] = job
        self.accepted += 1
        self._tg.start_soon(self._run_job, job)
        return job, True

    async def _run_job(self, job: _Job) -> None:
        """Send through the relay; a message that must wait (caps, lookups, the instance
        reconnecting, the disk) is tried again until :data:`MAX_DEFER_S`, then ``not_sent``."""
        deadline = self.clock.monotonic() + MAX_DEFER_S
        iid = job.instance_id
        try:
            while True:
                deferred = await self.relay.send_one(iid, lambda: self.instances.session(iid), job.message)
                if deferred is None:
                    return
                wait_s = max(MIN_RETRY_S, deferred.retry_after_s)
                if self.clock.monotonic() + wait_s > deadline:
                    self._not_sent(job, deferred)
                    return
                await self.clock.sleep(wait_s)
        except JournalUnavailable as exc:
            log.error("API send %s: the journal is not writable (%s): not sent", job.message_id, exc)
            job.not_sent = ("storage_unavailable", "the worker's journal is not writable", 5.0)
        except Exception:  # a bug costs this message, never the worker (a journaled row still wins)
            log.exception("API send %s raised unexpectedly", job.message_id)
            job.not_sent = ("internal_error", "the worker failed before sending (logged)", None)
        finally:
            self._jobs.pop(job.message_id, None)
            job.done.set()

    def _not_sent(self, job: _Job, deferred: Deferred) -> None:
        retry = round(deferred.retry_after_s, 1) if deferred.retry_after_s > 0 else None
        job.not_sent = (deferred.code, deferred.message, retry)
        log.warning("API send %s not sent (%s): %s", job.message_id, deferred.code, deferred.message,
                    extra={"instance_id": job.instance_id})
        try:
            self.journal.api_request_not_sent(job.message_id, deferred.code, deferred.message)
        except JournalUnavailable:
            pass  # read back as "interrupted": nothing was sent either way

    # ------------------------------------------------------------------ reading

    def outcome(self, instance_id: str, key: str, job: _Job | None = None) -> MessageOutcome:
        """What became of ``key`` (raises :class:`Refused` 404 ``message_not_found``); ``job``:
        the one this request waited for (it has left the jobs once done)."""
        mid = journal_id(instance_id, key)
        row = self.journal.outbound_get(mid)
        if row is not None and row.origin == "api":
            if row.state == "sending":
                return MessageOutcome(id=key, instance_id=instance_id, state="pending")
            if row.wa_message_id is not None and row.state in ("sent", "marked"):
                return MessageOutcome(id=key, instance_id=instance_id, state="sent", wa_message_id=row.wa_message_id)
            return MessageOutcome(id=key, instance_id=instance_id, state="failed", error_code=row.error_code,
                                  error=row.error)
        job = job or self._jobs.get(mid)
        if job is not None and not job.done.is_set():
            return MessageOutcome(id=key, instance_id=instance_id, state="pending")
        request = self.journal.api_request(mid)
        if request is None:
            raise Refused(404, "message_not_found", "no message was sent through this instance with that "
                                                    "Idempotency-Key (or it is older than the journal keeps)")
        if job is not None and job.not_sent is not None:
            code, error, retry = job.not_sent
        elif request.not_sent_code is not None:
            code, error, retry = request.not_sent_code, request.not_sent_error or "", None
        else:
            code, error, retry = "interrupted", "the worker stopped before the message reached WhatsApp", None
        return MessageOutcome(id=key, instance_id=instance_id, state="not_sent", error_code=code,
                              error=f"{error}; nothing was sent: the same request with the same Idempotency-Key "
                                    "sends it", retry_after_s=retry)


def _conflict() -> Refused:
    return Refused(409, "idempotency_conflict", "this Idempotency-Key was used with another body: a key names "
                                                "one message")


def _queued(mid: str, instance_id: str, message: SendMessage) -> QueuedMessage:
    """The request as the relay's :class:`QueuedMessage` (parsed like a polled record)."""
    record: dict[str, Any] = {"id": mid, **message.model_dump(exclude_none=True)}
    parsed = parse_messages([record], [])
    assert parsed is not None and len(parsed) == 1  # one dict with an id: always one record
    return replace(parsed[0], instance_id=instance_id)


def check_message(instance_id: str, message: SendMessage) -> tuple[str, str] | None:
    """What makes ``message`` unsendable before anything is recorded: (error_code, reason), or None."""
    msg = _queued("api:check", instance_id, message)
    if msg.problem is None:
        return None
    return msg.error_code or "invalid_message", msg.problem
