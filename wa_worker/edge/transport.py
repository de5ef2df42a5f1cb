"""The HTTP transport under :class:`~wa_worker.edge.client.EdgeClient`.

One call: :meth:`Transport.request` sends a request and returns the status, the
headers and a *bounded* body within one total deadline (connect, headers and
body together). What is read of the body is the caller's :class:`BodyPolicy`,
chosen from the status: ``strict`` reads (a 2xx to be parsed) fail past the cap
or the deadline; lenient reads (an acknowledgement, an error's snippet) keep
what arrived and never fail. Redirects are never followed, the environment's
proxy settings are ignored and at most ``max_connections`` requests are in
flight; the others wait in aiohttp's FIFO, whose cost does not grow with its
length (docs/performance.md: httpcore's pool queue did, quadratically).

Tests swap the transport (``EdgeClient(transport=...)``) rather than patch it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import anyio
from multidict import CIMultiDict, CIMultiDictProxy

# more header bytes than any proxy needs: an answer past it is refused (memory, log spam)
MAX_HEADER_BYTES = 64 * 1024


class TransportError(Exception):
    """The request failed before a status arrived, or the headers were unusable."""


class TransportTimeout(TransportError):
    """No status within the deadline, or a strict body not complete within it."""


class BodyTooLarge(TransportError):
    """A strict read went past its cap (declared or counted)."""

    def __init__(self, status: int, read: str) -> None:
        super().__init__(read)
        self.status = status
        self.read = read


@dataclass(frozen=True, slots=True)
class BodyPolicy:
    cap: int
    strict: bool


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes


class Transport(Protocol):
    async def request(self, method: str, url: str, *, params: Sequence[tuple[str, str]], headers: Mapping[str, str],
                      content: bytes | AsyncIterator[bytes] | None, timeout_s: float,
                      policy: Callable[[int], BodyPolicy]) -> Reply: ...

    async def aclose(self) -> None: ...


class AiohttpTransport:
    """aiohttp's client: one session, a bounded connector, ``trust_env=False``."""

    def __init__(self, *, max_connections: int = 32) -> None:
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # created lazily: a ClientSession belongs to the running event loop
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=self.max_connections,
                                               keepalive_timeout=30),
                trust_env=False,  # never an HTTP(S)_PROXY from the environment: the bearer stays ours
                skip_auto_headers=("User-Agent",),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def request(self, method: str, url: str, *, params: Sequence[tuple[str, str]], headers: Mapping[str, str],
                      content: bytes | AsyncIterator[bytes] | None, timeout_s: float,
                      policy: Callable[[int], BodyPolicy]) -> Reply:
        deadline = anyio.current_time() + timeout_s
        resp: aiohttp.ClientResponse | None = None
        try:
            try:
                with anyio.fail_after(timeout_s):
                    resp = await self._client().request(
                        method, url, params=list(params) or None, headers=dict(headers), data=content,
                        allow_redirects=False, timeout=aiohttp.ClientTimeout(total=None),
                    )
            except TimeoutError:
                raise TransportTimeout("no answer within the deadline") from None
            except aiohttp.ClientError as exc:
                raise TransportError(type(exc).__name__) from None
            if sum(len(k) + len(v) for k, v in resp.raw_headers) > MAX_HEADER_BYTES:
                raise TransportError("headers larger than 64 KiB")
            status = resp.status
            answer = policy(status)
            body = await (_read_strict(resp, answer.cap, deadline) if answer.strict
                          else _read_lenient(resp, answer.cap, deadline))
            return Reply(status, CIMultiDictProxy(CIMultiDict(resp.headers)), body)
        finally:
            if resp is not None:
                if resp.content.at_eof():
                    resp.release()  # the connection goes back to the pool
                else:
                    resp.close()  # unread bytes: the connection cannot be reused

    async def aclose(self) -> None:
        if self._session is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                await self._session.close()
            self._session = None


async def _read_strict(resp: aiohttp.ClientResponse, cap: int, deadline: float) -> bytes:
    declared = resp.headers.get("content-length", "")
    if declared.isdigit() and len(declared) < 20 and int(declared) > cap:
        raise BodyTooLarge(resp.status, declared)
    chunks: list[bytes] = []
    size = 0
    try:
        with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
            while chunk := await resp.content.readany():
                size += len(chunk)
                if size > cap:
                    raise BodyTooLarge(resp.status, str(size))
                chunks.append(chunk)
    except TimeoutError:
        raise TransportTimeout("the body did not arrive within the deadline") from None
    except aiohttp.ClientError as exc:
        raise TransportError(type(exc).__name__) from None
    return b"".join(chunks)


async def _read_lenient(resp: aiohttp.ClientResponse, cap: int, deadline: float) -> bytes:
    """What arrives of the first ``cap`` bytes before ``deadline``; never fails."""
    chunks: list[bytes] = []
    size = 0
    with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
        try:
            while size < cap and (chunk := await resp.content.readany()):
                chunks.append(chunk)
                size += len(chunk)
        except aiohttp.ClientError:
            pass  # a broken body: what arrived is all there is
    return b"".join(chunks)[:cap]
