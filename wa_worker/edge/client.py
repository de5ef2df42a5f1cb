"""HTTP client of the edge proxy (see docs/proxy-contract.md).

Every call carries the bearer secret, has a timeout, and either returns parsed,
validated data or raises :class:`EdgeError` after one clear log line. It never
retries by itself: the caller owns the retry policy (status pushes coalesce,
journal rows back off, polls wait for their next turn).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from typing import Any

import httpx

from .models import (
    InboundPayload,
    InstanceRef,
    MarkFailed,
    MarkSent,
    QueuedMessage,
    StatusUpdate,
    parse_instances,
    parse_messages,
)

log = logging.getLogger("wa_worker.edge")


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


def _is_transient_status(status: int) -> bool:
    return status in (408, 425, 429) or status >= 500


class EdgeClient:
    def __init__(
        self,
        base_url: str,
        secret: str,
        *,
        timeout_s: float = 10.0,
        http: httpx.AsyncClient | None = None,
        max_connections: int = 64,
        max_keepalive: int = 8,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._own_http = http is None
        self._http = http or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s),
            # few idle keep-alive connections: httpcore scans its pool on every request,
            # in time quadratic in the pool size (docs/performance.md)
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_keepalive),
        )
        self._timeout = httpx.Timeout(timeout_s)
        self._headers = {
            "Authorization": f"Bearer {secret}",
            "Accept": "application/json",
            "User-Agent": "wa-worker/0.1",
        }
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.last_ok_monotonic: float | None = None
        self.mark_failed_supported = True

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    # ------------------------------------------------------------------ transport

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
    ) -> Any:
        self.calls[endpoint] += 1
        url = f"{self.base_url}{path}"
        try:
            resp = await self._http.request(
                method,
                url,
                params=params,
                content=None if body is None else json.dumps(body, ensure_ascii=False).encode(),
                headers=self._headers if body is None else {**self._headers, "Content-Type": "application/json"},
                timeout=self._timeout,
            )
        except httpx.TimeoutException:
            return self._fail(EdgeError(endpoint, "timed out"))
        except httpx.HTTPError as exc:
            return self._fail(EdgeError(endpoint, f"connection failed ({type(exc).__name__})"))

        status = resp.status_code
        if 200 <= status < 300:
            self.last_ok_monotonic = time.monotonic()
            if not resp.content:
                return None
            try:
                return resp.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                return self._fail(EdgeError(endpoint, f"HTTP {status} with a body that is not JSON", status=status))
        # any answer means the proxy is reachable
        self.last_ok_monotonic = time.monotonic() if status < 500 else self.last_ok_monotonic
        snippet = resp.text[:300]
        if status in (401, 403):
            return self._fail(Unauthorized(endpoint, f"HTTP {status}: the proxy rejected WORKER_SECRET",
                                           status=status, transient=True, body=snippet))
        if status in (404, 410) and instance_scoped:
            return self._fail(InstanceGone(endpoint, f"HTTP {status}: unknown instance", status=status,
                                           transient=False, body=snippet), level=logging.INFO)
        if status in (400, 404, 405, 501) and optional:
            return self._fail(EndpointMissing(endpoint, f"HTTP {status}: not supported by the proxy",
                                              status=status, transient=False, body=snippet), level=logging.INFO)
        return self._fail(EdgeError(endpoint, f"HTTP {status}", status=status,
                                    transient=_is_transient_status(status), body=snippet))

    def _fail(self, err: EdgeError, level: int = logging.WARNING) -> Any:
        self.failures[err.endpoint] += 1
        log.log(level, "edge proxy call failed: %s", err)
        raise err

    def _reject(self, endpoint: str, reasons: list[str]) -> None:
        for r in reasons:
            self.rejected[r] += 1
        if reasons:
            log.warning("%s: skipped %d malformed record(s): %s", endpoint, len(reasons),
                        ", ".join(sorted(set(reasons))))

    # ------------------------------------------------------------------ contract

    async def disconnected_instances(self) -> list[InstanceRef]:
        ep = "disconnected-instances"
        payload = await self._request("GET", "/disconnected-instances", endpoint=ep)
        rejected: list[str] = []
        items = parse_instances(payload, rejected)
        self._reject(ep, rejected)
        if items is None:
            self._fail(EdgeError(ep, "response is not a list of instances", transient=True))
        return items  # type: ignore[return-value]

    async def update_status(self, update: StatusUpdate) -> None:
        await self._request("POST", "/update-status", endpoint="update-status", body=update.to_json(),
                            instance_scoped=True)

    async def queued_messages(self, instance_id: str) -> list[QueuedMessage]:
        ep = "queued-messages"
        payload = await self._request("GET", "/queued-messages", endpoint=ep, params={"instanceId": instance_id},
                                      instance_scoped=True)
        rejected: list[str] = []
        items = parse_messages(payload, rejected)
        self._reject(ep, rejected)
        if items is None:
            self._fail(EdgeError(ep, "response is not a list of messages", transient=True))
        return items  # type: ignore[return-value]

    async def queued_messages_batch(self) -> list[QueuedMessage]:
        """Batch mode: every instance's messages in one call.
        Raises :class:`EndpointMissing` when the proxy does not support it."""
        ep = "queued-messages"
        payload = await self._request("GET", "/queued-messages", endpoint=ep, optional=True)
        if not (isinstance(payload, dict) and isinstance(payload.get("messages"), list)):
            # a bare list is how a per-instance proxy answers a missing parameter
            # (e.g. a filter on a null instance id): never take it for batch support
            raise EndpointMissing(ep, "batch response is not {\"messages\": [...]}", transient=False)
        rejected: list[str] = []
        items = parse_messages(payload, rejected, batch=True)
        self._reject(ep, rejected)
        if items is None:
            self._fail(EdgeError(ep, "batch response is not a list of messages", transient=True))
        return items  # type: ignore[return-value]

    async def mark_sent(self, message_id: str, wa_message_id: str) -> None:
        body = MarkSent(messageId=message_id, wa_message_id=wa_message_id).model_dump()
        await self._request("POST", "/mark-sent", endpoint="mark-sent", body=body)

    async def mark_failed(self, message_id: str, error: str) -> bool:
        """Returns False (and stops calling) when the proxy has no such endpoint."""
        if not self.mark_failed_supported:
            return False
        body = MarkFailed(messageId=message_id, error=error[:500]).model_dump()
        try:
            await self._request("POST", "/mark-failed", endpoint="mark-failed", body=body, optional=True)
        except EndpointMissing as exc:
            if exc.status == 404:
                self.mark_failed_supported = False
                log.warning("the proxy has no /mark-failed (404): failed messages will not be reported "
                            "from now on")
                return False
            raise
        return True

    async def inbound(self, payload: InboundPayload | dict[str, Any]) -> None:
        body = payload.to_json() if isinstance(payload, InboundPayload) else payload
        await self._request("POST", "/inbound", endpoint="inbound", body=body)
