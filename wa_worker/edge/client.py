"""HTTP client of the edge proxy (see docs/proxy-contract.md).

Every call carries the bearer secret, has a *total* deadline (connect, headers
and body together) and a byte cap on what it reads, never follows a redirect,
and either returns parsed, validated data or raises :class:`EdgeError` after
one clear log line: whatever the proxy answers, nothing else escapes. It never
retries by itself: the caller owns the retry policy (status pushes coalesce,
journal rows back off, polls wait for their next turn).
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar, overload

import anyio
from prometheus_client import Histogram
from yarl import URL

from ..logutil import redact_url
from .transport import (
    AiohttpTransport,
    BodyPolicy,
    BodyTooLarge,
    Reply,
    Transport,
    TransportError,
    TransportTimeout,
)
from .events import PushEvents, parse_events
from .models import (
    InstanceRef,
    InstanceSettings,
    Lease,
    LeaseHolder,
    MarkFailed,
    MarkSent,
    QueuedMessage,
    StatusUpdate,
    parse_instance_settings,
    parse_instances,
    parse_lease_holder,
    parse_leases,
    parse_requeued,
    parse_messages,
)

log = logging.getLogger("wa_worker.edge")
_T = TypeVar("_T")

DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024
# what we read of an answer we do not parse: an error's snippet, a write's acknowledgement
_ERROR_BODY_BYTES = 2048
_ACK_BODY_BYTES = 64 * 1024
RETRY_AFTER_CAP_S = 300.0
# a GET /events answer names instances and a cursor: a few KiB; more is a broken proxy
EVENTS_MAX_BYTES = 1024 * 1024
HOLDER_MAX_BYTES = 16 * 1024  # GET /lease-holder: one small object
# proxy latency buckets (s): a healthy call is tens of ms, EDGE_TIMEOUT_S is 10 s by default
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# integers longer than this decode as +/-infinity (an out-of-range number every parser rejects)
_MAX_INT_DIGITS = 64

SECRET_HINT = "secret mismatch: the proxy rejected WORKER_SECRET"
NOT_FOUND_HINT = "404 on a contract path: check the path of EDGE_BASE_URL"


class EdgeError(Exception):
    """A failed proxy call. ``transient`` errors are worth retrying."""

    def __init__(self, endpoint: str, message: str, *, status: int | None = None, transient: bool = True,
                 body: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(f"{endpoint}: {message}")
        self.endpoint = endpoint
        self.status = status
        self.transient = transient
        self.body = body
        # the least the caller should wait before retrying (429/503 Retry-After), already capped
        self.retry_after_s = retry_after_s


class InstanceGone(EdgeError):
    """404/410 on an instance-scoped call: the proxy no longer knows the instance."""


class EndpointMissing(EdgeError):
    """404 on an optional endpoint (``/mark-failed``, batch ``/queued-messages``)."""


class Unauthorized(EdgeError):
    """401/403: the proxy refuses our WORKER_SECRET."""


class LeaseLost(EdgeError):
    """409 ``{"error": "lease_lost"}``: the lease token sent is not the instance's current one
    (fencing): this worker must no longer act for the instance. Never transient."""


def _no_token(_instance_id: str) -> int | None:
    return None


def _is_transient_status(status: int) -> bool:
    return status in (408, 425, 429) or status >= 500


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_int(text: str) -> Any:
    if len(text) > _MAX_INT_DIGITS:
        return -math.inf if text.startswith("-") else math.inf
    return int(text)


def decode_json(raw: bytes) -> Any:
    """Strict UTF-8 JSON. ``NaN``/``Infinity`` are refused; numbers out of range
    (``1e999``, an integer of thousands of digits) decode as infinities, which
    the record parsers reject one by one. Raises ``ValueError`` (also for
    non-UTF-8 input and absurd nesting)."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, parse_int=_parse_int)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def parse_retry_after(value: str | None, *, now: float | None = None, cap_s: float = RETRY_AFTER_CAP_S) -> float | None:
    """``Retry-After`` in seconds or as an HTTP date, clamped to ``[0, cap_s]``; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()[:64]
    delay: float
    try:
        delay = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when is None:
            return None
        delay = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(delay):
        return None
    return min(max(delay, 0.0), cap_s)


#: the statuses that mean "this proxy has no such endpoint" on an optional one
ABSENT = frozenset({404, 405, 501})


def _absent_or_refused(ep: str, exc: EndpointMissing, *, transient: bool) -> EdgeError:
    """An optional endpoint's 4xx/5xx: the :class:`EndpointMissing` itself when it means "absent"
    (404/405/501, the caller switches the feature off), else an :class:`EdgeError`."""
    if exc.status in ABSENT:
        return exc
    return EdgeError(ep, str(exc).split(": ", 1)[-1], status=exc.status, transient=transient, body=exc.body)


class EdgeClient:
    def __init__(
        self,
        base_url: str,
        secret: str,
        *,
        timeout_s: float = 10.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        transport: Transport | None = None,
        max_connections: int = 32,
    ) -> None:
        parsed = URL(base_url)
        # a query in EDGE_BASE_URL (e.g. ?apikey=...) goes with every call, after the path
        self._base_params = [(k, v) for k, v in parsed.query.items()]
        if parsed.user is not None or parsed.password is not None:
            # it would become Basic auth next to (or instead of) our bearer
            log.warning("EDGE_BASE_URL contains user:password@, which is not sent: the worker authenticates "
                        "with the bearer WORKER_SECRET")
        self.base_url = str(parsed.with_user(None).with_query(None).with_fragment(None)).rstrip("/")
        self._own_transport = transport is None
        self.max_connections = max_connections
        self.in_flight = 0  # calls started and not finished (waiting for a connection included)
        # at most max_connections calls in flight; the rest wait in a FIFO whose cost
        # does not grow with its length (docs/performance.md)
        self._transport: Transport = transport or AiohttpTransport(max_connections=max_connections)
        self.timeout_s = timeout_s
        self.max_response_bytes = max_response_bytes
        self._secret = secret
        self._headers = {
            "Authorization": f"Bearer {secret}",
            "Accept": "application/json",
            "User-Agent": "wa-worker/0.1",
        }
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        # registered by the worker on its own registry (/metrics); unregistered it only counts
        self.latency = Histogram("wa_worker_proxy_request_duration_seconds",
                                 "Proxy calls: time to a complete answer (or the failure)", ["endpoint"],
                                 registry=None, buckets=LATENCY_BUCKETS_S)
        self.rejected: Counter[str] = Counter()
        self.last_ok_monotonic: float | None = None
        self.mark_failed_supported = True
        # endpoint -> hint of a misconfiguration it revealed (cleared by its next 2xx)
        self._problems: dict[str, str] = {}
        self._answered_ok: set[str] = set()  # endpoints that have answered 2xx: their path exists
        # leases (docs/proxy-contract.md, "Leases and fencing"): off until enable_leases(); then every
        # call carries X-Worker-Id and instance-scoped calls the instance's current token
        self.worker_id: str | None = None
        self.lease_token_of: Callable[[str], int | None] = _no_token
        # told about every 409 lease_lost on an instance-scoped call: (instance id, the token refused)
        self.on_lease_lost: Callable[[str, int], None] | None = None
        self.lease_lost = 0  # 409 lease_lost answers

    def enable_leases(self, worker_id: str, token_of: Callable[[str], int | None]) -> None:
        """Leases are on: every call carries ``X-Worker-Id``, instance-scoped calls ``token_of(id)``."""
        self.worker_id = worker_id
        self.lease_token_of = token_of
        self._headers = {**self._headers, "X-Worker-Id": worker_id}

    def _lease_lost(self, instance_id: str | None, token: int | None) -> None:
        self.lease_lost += 1
        if instance_id is not None and token is not None and self.on_lease_lost is not None:
            self.on_lease_lost(instance_id, token)

    @property
    def backlog(self) -> int:
        """Calls waiting for a connection: the proxy (or the link) is not keeping up."""
        return max(0, self.in_flight - self.max_connections)

    @property
    def config_problem(self) -> str | None:
        """What the proxy's answers say is misconfigured (wrong secret, wrong URL
        path, a redirect), or None. ``/ready`` reports it."""
        hints = sorted(set(self._problems.values()))
        return "; ".join(hints) if hints else None

    async def aclose(self) -> None:
        if self._own_transport:
            await self._transport.aclose()

    # ------------------------------------------------------------------ transport

    # long: one proxy call end to end (deadline, stream, cap, status mapping) reads best in one place
    async def _request(
        self,
        method: str,
        path: str,
        *,
        endpoint: str,
        params: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
        instance_scoped: bool = False,
        optional: bool = False,
        parse: bool = True,
        stream: AsyncIterator[bytes] | None = None,
        raw_headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
        max_bytes: int | None = None,
        missing_level: int = logging.INFO,
    ) -> Any:
        """One call. ``parse``: decode the 2xx body as JSON (reads); otherwise the
        2xx status alone is the answer (writes) and the body is barely read.
        ``stream``: a streamed body (with its ``raw_headers``) instead of JSON;
        ``timeout_s``: a longer total deadline for it; ``max_bytes``: a smaller cap
        on a read than EDGE_MAX_RESPONSE_BYTES; ``missing_level``: the log level of
        an optional endpoint's absence (the caller may say it once itself)."""
        self.calls[endpoint] += 1
        content: bytes | AsyncIterator[bytes] | None = stream if stream is not None else (
            None if body is None else _encode(body))
        headers = self._headers if body is None else {**self._headers, "Content-Type": "application/json"}
        if raw_headers:
            headers = {**headers, **raw_headers}
        total_s = timeout_s or self.timeout_s
        strict_cap = min(self.max_response_bytes, max_bytes or self.max_response_bytes)

        def policy(status: int) -> BodyPolicy:
            if 200 <= status < 300:
                # a read is parsed: all of it or an error. A write's status is the answer:
                # read a little (keeps the connection reusable), never fail on the rest
                return BodyPolicy(strict_cap, True) if parse else BodyPolicy(_ACK_BODY_BYTES, False)
            return BodyPolicy(_ERROR_BODY_BYTES, False)

        self.in_flight += 1
        started = time.monotonic()
        try:
            reply = await self._transport.request(
                method, f"{self.base_url}{path}", params=[*self._base_params, *(params or {}).items()],
                headers=headers, content=content, timeout_s=total_s, policy=policy)
        except TransportTimeout:
            return self._fail(EdgeError(endpoint, f"timed out (no complete answer within {total_s:g}s)"))
        except BodyTooLarge as exc:
            cap_name = "EDGE_MAX_RESPONSE_BYTES" if strict_cap == self.max_response_bytes else "its cap"
            return self._fail(EdgeError(endpoint, f"response larger than {cap_name} "
                                                  f"({strict_cap} bytes; read {exc.read})",
                                        status=exc.status))
        except TransportError as exc:
            return self._fail(EdgeError(endpoint, f"connection failed ({exc})"))
        finally:
            self.in_flight -= 1
            self.latency.labels(endpoint).observe(time.monotonic() - started)
        status = reply.status
        if 200 <= status < 300:
            self.last_ok_monotonic = time.monotonic()
            self._answered_ok.add(endpoint)
            self._resolved(endpoint)
            return self._decode(endpoint, status, reply.body) if parse else None
        snippet = reply.body.decode("utf-8", "replace")
        snippet = snippet.replace(self._secret, "***")[:300] if self._secret else snippet[:300]
        return self._error_status(endpoint, reply, snippet, instance_scoped=instance_scoped, optional=optional,
                                  missing_level=missing_level)

    def _decode(self, endpoint: str, status: int, raw: bytes) -> Any:
        if not raw.strip():
            return None
        try:
            return decode_json(raw)
        except ValueError as exc:
            return self._fail(EdgeError(endpoint, f"HTTP {status} with a body that is not JSON "
                                                  f"({_short(str(exc))})", status=status))

    def _error_status(self, endpoint: str, resp: Reply, snippet: str, *, instance_scoped: bool,
                      optional: bool, missing_level: int = logging.INFO) -> Any:
        status = resp.status
        # any answer means the proxy is reachable
        self.last_ok_monotonic = time.monotonic() if status < 500 else self.last_ok_monotonic
        if 300 <= status < 400:
            target = redact_url(resp.headers.get("location", "")[:500]) or "(no Location)"
            # /ready is public: its reason names no host; the log line names the target
            self._problem(endpoint, "the proxy answers with a redirect: set EDGE_BASE_URL to the final URL "
                                    "(redirects are not followed)", status, detail=f"redirect to {target}")
            return self._fail(EdgeError(endpoint, f"HTTP {status} redirect to {target} (not followed)",
                                        status=status, transient=True, body=snippet), level=logging.DEBUG)
        if status in (401, 403):
            self._problem(endpoint, SECRET_HINT, status)
            return self._fail(Unauthorized(endpoint, f"HTTP {status}: the proxy rejected WORKER_SECRET",
                                           status=status, transient=True, body=snippet), level=logging.DEBUG)
        if status == 409 and "lease_lost" in snippet:
            return self._fail(LeaseLost(endpoint, "HTTP 409: lease lost (another worker holds the instance now)",
                                        status=status, transient=False, body=snippet), level=logging.INFO)
        if status in (404, 410) and instance_scoped:
            return self._fail(InstanceGone(endpoint, f"HTTP {status}: unknown instance", status=status,
                                           transient=False, body=snippet), level=logging.INFO)
        if status in (400, 404, 405, 501) and optional:
            return self._fail(EndpointMissing(endpoint, f"HTTP {status}: not supported by the proxy",
                                              status=status, transient=False, body=snippet), level=missing_level)
        if status == 404:
            if endpoint in self._answered_ok:
                # the path exists (it has answered 2xx): the proxy does not know this
                # record (e.g. a deleted instance); the caller's retry policy decides
                return self._fail(EdgeError(endpoint, "HTTP 404 (the proxy does not know this record)",
                                            status=status, transient=True, body=snippet), level=logging.INFO)
            # a contract path the proxy does not have: the URL is wrong, which a
            # restart with the right one fixes; never a verdict on the record
            self._problem(endpoint, NOT_FOUND_HINT, status)
            return self._fail(EdgeError(endpoint, "HTTP 404", status=status, transient=True, body=snippet),
                              level=logging.DEBUG)
        retry_after = None
        if status in (429, 503):
            retry_after = parse_retry_after(resp.headers.get("retry-after"))
        suffix = f" (retry after {retry_after:g}s)" if retry_after is not None else ""
        return self._fail(EdgeError(endpoint, f"HTTP {status}{suffix}", status=status,
                                    transient=_is_transient_status(status), body=snippet,
                                    retry_after_s=retry_after))

    def _problem(self, endpoint: str, hint: str, status: int, *, detail: str = "") -> None:
        """Record a misconfiguration; an ERROR only when it is news."""
        if hint not in self._problems.values():
            log.error("edge proxy misconfigured: %s (HTTP %d on %s%s)", hint, status, endpoint,
                      f", {detail}" if detail else "")
        self._problems[endpoint] = hint

    def _resolved(self, endpoint: str) -> None:
        hint = self._problems.pop(endpoint, None)
        if hint is not None and hint not in self._problems.values():
            log.info("edge proxy answers %s again: resolved (%s)", endpoint, hint)

    def _fail(self, err: EdgeError, level: int = logging.WARNING) -> Any:
        self.failures[err.endpoint] += 1
        log.log(level, "edge proxy call failed: %s", err)
        raise err

    @overload
    def _parsed(self, endpoint: str, payload: Any, parser: Callable[[Any, list[str]], _T | None],
                not_parsed: str) -> _T: ...

    @overload
    def _parsed(self, endpoint: str, payload: Any, parser: Callable[[Any, list[str]], _T | None],
                not_parsed: None) -> _T | None: ...

    def _parsed(self, endpoint: str, payload: Any, parser: Callable[[Any, list[str]], _T | None],
                not_parsed: str | None) -> _T | None:
        """``parser(payload, rejected)``, its rejected records counted and logged; a None from it
        fails the call with the transient error ``not_parsed`` (``not_parsed`` None: None is an answer)."""
        rejected: list[str] = []
        parsed = parser(payload, rejected)
        self._reject(endpoint, rejected)
        if parsed is None and not_parsed is not None:
            return self._fail(EdgeError(endpoint, not_parsed, transient=True))
        return parsed

    def _reject(self, endpoint: str, reasons: list[str]) -> None:
        for r in reasons:
            self.rejected[r] += 1
        if reasons:
            log.warning("%s: ignored %d malformed record(s) or field(s): %s", endpoint, len(reasons),
                        ", ".join(sorted(set(reasons))))

    # ------------------------------------------------------------------ contract

    async def disconnected_instances(self) -> list[InstanceRef]:
        ep = "disconnected-instances"
        payload = await self._request("GET", "/disconnected-instances", endpoint=ep)
        return self._parsed(ep, payload, parse_instances, "response is not a list of instances")

    async def instance_settings(self, since: str | None) -> tuple[list[InstanceSettings], str | None]:
        """``GET /instance-settings[?since=<cursor>]`` (optional): the instances whose
        settings or ``proxy_url`` changed since ``cursor`` (all of them without one),
        and the next cursor. Raises :class:`EndpointMissing` on 404/405/501."""
        ep = "instance-settings"
        try:
            payload = await self._request("GET", "/instance-settings", endpoint=ep,
                                          params={"since": since} if since is not None else None, optional=True)
        except EndpointMissing as exc:
            raise _absent_or_refused(ep, exc, transient=False) from None
        return self._parsed(ep, payload, parse_instance_settings, "response is not {\"instances\": [...], \"cursor\"}")

    async def leases(self, worker_id: str, capacity: int, held: dict[str, int], release: dict[str, int], *,
                     api_url: str | None = None, unsent: dict[str, list[str]] | None = None,
                     ) -> tuple[float, list[Lease], list[str] | None]:
        """``POST /leases`` (optional): renew ``held``, give back ``release`` (instance id → token);
        returns ``ttl_s``, every lease held after the call and the handed-back claims put back to
        queued (None: the proxy does not say). ``unsent`` (instance id → message ids, for items of
        ``held`` or ``release``): claims made under that token and never begun, handed back.
        ``api_url``: where API clients reach this worker (sent only when set). Raises
        :class:`EndpointMissing` on 404/405/501 (a proxy without leases), :class:`EdgeError` otherwise."""
        ep = "leases"
        unsent = unsent or {}

        def items(tokens: dict[str, int]) -> list[dict[str, Any]]:
            return [{"instanceId": i, "token": t, **({"unsent": unsent[i]} if unsent.get(i) else {})}
                    for i, t in sorted(tokens.items())]

        body: dict[str, Any] = {"worker_id": worker_id, "capacity": capacity,
                                "held": items(held), "release": items(release)}
        if api_url is not None:
            body["api_url"] = api_url
        try:
            payload = await self._request("POST", "/leases", endpoint=ep, body=body, optional=True,
                                          raw_headers={"X-Worker-Id": worker_id})
        except EndpointMissing as exc:
            raise _absent_or_refused(ep, exc, transient=False) from None
        def parse(answer: Any, rejected: list[str]) -> tuple[float, list[Lease], list[str] | None] | None:
            parsed = parse_leases(answer, rejected)
            return None if parsed is None else (parsed[0], parsed[1], parse_requeued(answer, rejected))
        return self._parsed(ep, payload, parse, "response is not {\"ttl_s\", \"leases\": [...]}")

    async def lease_holder(self, instance_id: str) -> LeaseHolder | None:
        """``GET /lease-holder?instanceId=<id>`` (optional): who holds the instance's lease and
        where API clients reach it. None when nobody does (404), when the proxy has no such route
        (404/405/501) or when its answer is not about this instance; :class:`EdgeError` otherwise."""
        ep = "lease-holder"
        try:
            payload = await self._request("GET", "/lease-holder", endpoint=ep, params={"instanceId": instance_id},
                                          optional=True, max_bytes=HOLDER_MAX_BYTES, missing_level=logging.DEBUG)
        except EndpointMissing as exc:
            if exc.status in ABSENT:
                return None
            raise _absent_or_refused(ep, exc, transient=False) from None
        # None is an answer here (not about this instance): never a failure
        return self._parsed(ep, payload, lambda p, rejected: parse_lease_holder(p, instance_id, rejected), None)

    async def events(self, *, wait_s: float, cursor: str | None, worker_id: str | None) -> PushEvents:
        """``GET /events?wait=<s>[&cursor=…]`` (optional push channel): a long poll answered
        at the first queued message or lease change for this worker, else after ``wait_s``.
        ``worker_id``: the ``X-Worker-Id`` header (leases on; None: none, every instance's events).
        Its deadline is ``wait_s`` + EDGE_TIMEOUT_S, its answer at most 1 MiB. Raises
        :class:`EndpointMissing` on 404/405/501 (logged at DEBUG: the caller says it once)."""
        ep = "events"
        params = {"wait": f"{wait_s:g}"}
        if cursor is not None:
            params["cursor"] = cursor
        try:
            payload = await self._request("GET", "/events", endpoint=ep, params=params, optional=True,
                                          raw_headers={"X-Worker-Id": worker_id} if worker_id else None,
                                          timeout_s=wait_s + self.timeout_s,
                                          max_bytes=EVENTS_MAX_BYTES, missing_level=logging.DEBUG)
        except EndpointMissing as exc:
            raise _absent_or_refused(ep, exc, transient=True) from None
        return self._parsed(ep, payload, parse_events, "response is not {\"events\": [...]}")

    async def update_status(self, update: StatusUpdate) -> None:
        token = self.lease_token_of(update.instanceId) if update.lease_token is None else update.lease_token
        if token is not None:
            update = update.model_copy(update={"lease_token": token})
        try:
            await self._request("POST", "/update-status", endpoint="update-status", body=update.to_json(),
                                instance_scoped=True, parse=False)
        except LeaseLost:
            self._lease_lost(update.instanceId, token)
            raise

    async def queued_messages(self, instance_id: str, limit: int | None = None) -> list[QueuedMessage]:
        """``limit``: at most that many (what pacing lets the instance send now); a proxy may ignore it.
        With leases the claim carries the instance's token, and each message the token it was claimed
        under (the one sent, unless the proxy says otherwise)."""
        ep = "queued-messages"
        params = {"instanceId": instance_id}
        if limit is not None:
            params["limit"] = str(limit)
        token = self.lease_token_of(instance_id)
        if token is not None:
            params["lease_token"] = str(token)
        try:
            payload = await self._request("GET", "/queued-messages", endpoint=ep, params=params,
                                          instance_scoped=True)
        except LeaseLost:
            self._lease_lost(instance_id, token)
            raise
        items = self._parsed(ep, payload, parse_messages, "response is not a list of messages")
        if token is not None:
            items = [m if m.lease_token is not None else replace(m, lease_token=token) for m in items]
        return items

    async def queued_messages_batch(self) -> list[QueuedMessage]:
        """Batch mode: every instance's messages in one call.
        Raises :class:`EndpointMissing` when the proxy does not support it."""
        ep = "queued-messages"
        payload = await self._request("GET", "/queued-messages", endpoint=ep, optional=True)
        if isinstance(payload, (str, int, float, bool)):
            # garbage, not a verdict on batch support (which would end batch polling for good)
            return self._fail(EdgeError(ep, f"batch response is a bare {type(payload).__name__}", transient=True))
        if not (isinstance(payload, dict) and isinstance(payload.get("messages"), list)):
            # a bare list is how a per-instance proxy answers a missing parameter
            # (e.g. a filter on a null instance id): never take it for batch support
            raise EndpointMissing(ep, "batch response is not {\"messages\": [...]}", transient=False)
        return self._parsed(ep, payload, lambda p, rejected: parse_messages(p, rejected, batch=True),
                            "batch response is not a list of messages")

    async def mark_sent(self, message_id: str, wa_message_id: str, *, lease_token: int | None = None,
                        instance_id: str | None = None) -> None:
        """``lease_token``: the token the message was claimed under (leases; None: not sent)."""
        body = MarkSent(messageId=message_id, wa_message_id=wa_message_id, lease_token=lease_token).to_json()
        try:
            await self._request("POST", "/mark-sent", endpoint="mark-sent", body=body, parse=False)
        except LeaseLost:
            self._lease_lost(instance_id, lease_token)
            raise

    async def mark_failed(self, message_id: str, error: str, error_code: str | None = None, *,
                          lease_token: int | None = None, instance_id: str | None = None) -> bool:
        """Returns False (and stops calling) when the proxy has no such endpoint.
        ``error_code`` is the machine-readable reason (omitted when None); ``lease_token`` the
        token the message was claimed under (leases; None: not sent)."""
        if not self.mark_failed_supported:
            return False
        body = MarkFailed(messageId=message_id, error=error[:500], error_code=error_code,
                          lease_token=lease_token).to_json()
        try:
            await self._request("POST", "/mark-failed", endpoint="mark-failed", body=body, optional=True,
                                parse=False)
        except LeaseLost:
            self._lease_lost(instance_id, lease_token)
            raise
        except EndpointMissing as exc:
            if exc.status == 404:
                self.mark_failed_supported = False
                log.warning("the proxy has no /mark-failed (404): failed messages will not be reported "
                            "from now on")
                return False
            raise
        return True

    async def inbound(self, payload: dict[str, Any]) -> None:
        token = self.lease_token_of(payload["instanceId"]) if isinstance(payload.get("instanceId"), str) else None
        if token is not None:
            payload = {**payload, "lease_token": token}  # a fact: never refused for it (contract)
        await self._request("POST", "/inbound", endpoint="inbound", body=payload, parse=False)

    async def message_status(self, statuses: list[dict[str, Any]]) -> None:
        """``POST /message-status`` (receipts, at most 100 per call). Raises
        :class:`EndpointMissing` on 404/405/501 (the caller switches receipts off),
        :class:`EdgeError` otherwise."""
        ep = "message-status"
        if self.worker_id is not None:
            statuses = [self._with_token(st) for st in statuses]
        try:
            await self._request("POST", "/message-status", endpoint=ep, body={"statuses": statuses},
                                optional=True, parse=False)
        except EndpointMissing as exc:
            raise _absent_or_refused(ep, exc, transient=False) from None

    async def upload_media(self, instance_id: str, wa_message_id: str, path: Path, *, mimetype: str,
                           filename: str | None, sha256: str, size: int) -> str:
        """``POST /upload-media``: the file's bytes, streamed. Returns the answer's
        ``url`` (or ``path``). Raises :class:`EndpointMissing` on 404/405/501 (the
        caller remembers it), :class:`EdgeError` otherwise. The total deadline
        grows with the size (at least 1 MB/s on top of EDGE_TIMEOUT_S)."""
        ep = "upload-media"
        headers = {"Content-Type": mimetype, "X-Sha256": sha256, "Content-Length": str(size)}
        if filename:
            # header values are latin-1: a non-ASCII name travels percent-encoded
            headers["X-Filename"] = urllib.parse.quote(filename, safe=" ()[]+,;=@-._~")
        params = {"instanceId": instance_id, "wa_message_id": wa_message_id}
        token = self.lease_token_of(instance_id)
        if token is not None:
            params["lease_token"] = str(token)
        try:
            answer = await self._request("POST", "/upload-media", endpoint=ep, params=params,
                                         stream=_file_chunks(path), raw_headers=headers,
                                         timeout_s=self.timeout_s + size / 1_000_000, optional=True)
        except EndpointMissing as exc:
            raise _absent_or_refused(ep, exc, transient=False) from None
        location = (answer.get("url") or answer.get("path")) if isinstance(answer, dict) else None
        if not isinstance(location, str) or not location.strip() or len(location) > 4096:
            return self._fail(EdgeError(ep, "answer has no \"url\" (or \"path\") string", transient=False))
        return location.strip()

    def _with_token(self, status: dict[str, Any]) -> dict[str, Any]:
        iid = status.get("instanceId")
        token = self.lease_token_of(iid) if isinstance(iid, str) else None
        return status if token is None else {**status, "lease_token": token}

    async def probe(self, method: str, path: str, params: dict[str, str] | None = None,
                    body: dict[str, Any] | None = None) -> Reply:
        """One call for diagnostics (``wa-worker doctor``): the status, headers and
        at most 2 KiB of the body, whatever the status. Raises :class:`EdgeError`
        only when no answer arrives (connection failure, timeout)."""
        headers = self._headers if body is None else {**self._headers, "Content-Type": "application/json"}
        try:
            return await self._transport.request(
                method, f"{self.base_url}{path}", params=[*self._base_params, *(params or {}).items()],
                headers=headers, content=None if body is None else _encode(body), timeout_s=self.timeout_s,
                policy=lambda status: BodyPolicy(_ERROR_BODY_BYTES, False))
        except TransportTimeout:
            raise EdgeError(path, f"timed out (no answer within {self.timeout_s:g}s)") from None
        except TransportError as exc:
            raise EdgeError(path, f"connection failed ({exc})") from None


async def _file_chunks(path: Path, chunk_bytes: int = 256 * 1024) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as f:
        while chunk := await f.read(chunk_bytes):
            yield chunk


def _encode(body: dict[str, Any]) -> bytes:
    try:
        return json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        # a lone surrogate (not UTF-8-encodable): ASCII escapes are valid JSON still
        return json.dumps(body).encode()


def _short(text: str) -> str:
    return text if len(text) <= 120 else text[:117] + "..."
