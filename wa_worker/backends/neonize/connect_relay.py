"""A loopback HTTP CONNECT relay between the neonize clients and the network.

Every client's proxy is ``http://<ticket-token>:x@127.0.0.1:<port>``, so each TCP
connection the Go side opens arrives labelled with its attempt; revoking the
ticket cuts them all (why: docs/neonize.md, "The CONNECT relay"). Only loopback
clients holding a live ticket can use it. Upstream proxies (one per ticket):
``http://[user:pass@]host:port`` (HTTP CONNECT), ``https://…`` (CONNECT inside
TLS to the proxy) and ``socks5://[user:pass@]host:port`` (RFC 1928, the proxy
resolves the name; user/password auth RFC 1929).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import logging
import secrets
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from ...upstream import parse_proxy_url

_HEAD_LIMIT = 16 * 1024
_BUF = 64 * 1024


class RelayError(Exception):
    """The upstream could not be reached (reported to the client as 502)."""


@dataclass(frozen=True, slots=True)
class UpstreamProxy:
    host: str
    port: int
    auth: str | None = None  # "user:pass"
    scheme: str = "http"  # http (CONNECT), https (CONNECT over TLS), socks5
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> "UpstreamProxy":
        """Raises ValueError (:class:`~wa_worker.upstream.ProxyProblem`, no credentials in it)."""
        p = parse_proxy_url(url)
        auth = f"{p.username}:{p.password or ''}" if p.username is not None else None
        return cls(p.host, p.port, auth, p.scheme, p.username, p.password)


@dataclass(eq=False)
class RelayTicket:
    """One connection attempt's right to use the relay."""

    label: str
    token: str
    proxy_url: str
    upstream: UpstreamProxy | None = None
    on_first_request: Callable[[], object] | None = None
    revoked: bool = False
    connections: int = 0
    bytes_up: int = 0  # client -> WhatsApp
    bytes_down: int = 0  # WhatsApp -> client
    last_error: str | None = None
    _open: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def open_connections(self) -> int:
        return len(self._open)


class ConnectRelay:
    """Asyncio HTTP CONNECT relay on 127.0.0.1 (see module doc)."""

    def __init__(
        self,
        *,
        dial_timeout_s: float = 20.0,
        head_timeout_s: float = 10.0,
        allowed_ports: frozenset[int] | None = frozenset({443, 80, 5222}),
        resolver_threads: int = 4,
        log: logging.Logger | None = None,
        upstream_tls: ssl.SSLContext | None = None,
    ) -> None:
        """``upstream_tls``: how ``https://`` upstream proxies are verified (default: the system CAs)."""
        self.dial_timeout_s = dial_timeout_s
        self.upstream_tls = upstream_tls or ssl.create_default_context()
        self.head_timeout_s = head_timeout_s
        self.allowed_ports = allowed_ports
        self.log = log or logging.getLogger(__name__)
        self._resolver_threads = resolver_threads
        self._resolver: concurrent.futures.ThreadPoolExecutor | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tickets: dict[str, RelayTicket] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self.port: int | None = None
        self.bytes_up = 0  # every ticket's, revoked ones included (/metrics)
        self.bytes_down = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> int:
        if self._server is not None:
            assert self.port is not None
            return self.port
        self._resolver = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._resolver_threads, thread_name_prefix="wa-relay-dns"
        )
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, backlog=512)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def __aenter__(self) -> "ConnectRelay":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for ticket in list(self._tickets.values()):
            self.revoke(ticket)
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=2.0)
        if server is not None:
            try:
                await asyncio.wait_for(server.wait_closed(), 2.0)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                pass
        if self._resolver is not None:
            self._resolver.shutdown(wait=False, cancel_futures=True)
            self._resolver = None

    # ------------------------------------------------------------------ tickets

    def issue(
        self,
        label: str,
        *,
        upstream: str | None = None,
        on_first_request: Callable[[], object] | None = None,
    ) -> RelayTicket:
        """A new ticket; give ``ticket.proxy_url`` to the client."""
        if self.port is None:
            raise RuntimeError("relay not started")
        up = UpstreamProxy.parse(upstream) if upstream else None
        token = secrets.token_hex(16)
        ticket = RelayTicket(
            label=label,
            token=token,
            proxy_url=f"http://{token}:x@127.0.0.1:{self.port}",
            upstream=up,
            on_first_request=on_first_request,
        )
        self._tickets[token] = ticket
        return ticket

    def abort(self, ticket: RelayTicket) -> int:
        """Close every open connection of ``ticket``; return how many."""
        tasks = list(ticket._open)
        for task in tasks:
            task.cancel()
        return len(tasks)

    def revoke(self, ticket: RelayTicket) -> int:
        """Abort the ticket's connections and refuse any new one."""
        ticket.revoked = True
        ticket.on_first_request = None
        self._tickets.pop(ticket.token, None)
        return self.abort(ticket)

    @property
    def tickets(self) -> list[RelayTicket]:
        return list(self._tickets.values())

    # ------------------------------------------------------------------ serving

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        ticket: RelayTicket | None = None
        upstream_writer: asyncio.StreamWriter | None = None
        aborted = False
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.head_timeout_s)
            if len(head) > _HEAD_LIMIT:
                raise ValueError("request head too large")
            method, target, headers = _parse_head(head)
            ticket = self._admit(headers, task)
            if ticket is None:
                await _reply(writer, b"407 Proxy Authentication Required", b'Proxy-Authenticate: Basic realm="wa-worker"\r\n')
                return
            if method != "CONNECT":
                await _reply(writer, b"405 Method Not Allowed")
                return
            host, port = _split_target(target)
            if self.allowed_ports is not None and port not in self.allowed_ports:
                await _reply(writer, b"403 Forbidden")
                return
            upstream = await self._dial_or_reply(ticket, host, port, writer)
            if upstream is None:
                return
            up_reader, up_writer = upstream
            upstream_writer = up_writer
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await self._pipe(ticket, reader, writer, up_reader, up_writer)
            aborted = True  # a tunnel ends when either side does: drop the rest
        except asyncio.CancelledError:
            aborted = True  # revoke/abort/aclose: reset both sides now
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, OSError) as exc:
            if ticket is not None:
                ticket.last_error = f"relay: {exc.__class__.__name__}: {exc}"
        finally:
            _close(writer, aborted)
            if upstream_writer is not None:
                _close(upstream_writer, aborted)
            if ticket is not None:
                ticket._open.discard(task)
            self._handlers.discard(task)

    def _admit(self, headers: dict[str, str], task: "asyncio.Task[None]") -> RelayTicket | None:
        """The live ticket named by ``Proxy-Authorization`` (None: refuse), counted."""
        ticket = self._tickets.get(_token_of(headers.get("proxy-authorization", "")))
        if ticket is None or ticket.revoked:
            return None
        ticket._open.add(task)
        ticket.connections += 1
        cb, ticket.on_first_request = ticket.on_first_request, None
        if cb is not None:
            try:
                cb()
            except Exception:  # noqa: BLE001 - a callback bug must not break the tunnel
                self.log.exception("relay first-request callback failed")
        return ticket

    async def _dial_or_reply(
        self, ticket: RelayTicket, host: str, port: int, writer: asyncio.StreamWriter
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The upstream streams, or None after answering 504/502 (reason on the ticket)."""
        try:
            return await asyncio.wait_for(self._dial(host, port, ticket.upstream), self.dial_timeout_s)
        except asyncio.TimeoutError:
            ticket.last_error = f"dial {host}:{port} timed out after {self.dial_timeout_s:g} s"
            await _reply(writer, b"504 Gateway Timeout")
        except (OSError, RelayError, ValueError) as exc:
            ticket.last_error = f"dial {host}:{port}: {exc}"
            await _reply(writer, b"502 Bad Gateway")
        return None

    async def _pipe(
        self,
        ticket: RelayTicket,
        c_reader: asyncio.StreamReader,
        c_writer: asyncio.StreamWriter,
        u_reader: asyncio.StreamReader,
        u_writer: asyncio.StreamWriter,
    ) -> None:
        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            while True:
                data = await src.read(_BUF)
                if not data:
                    break
                if up:
                    ticket.bytes_up += len(data)
                    self.bytes_up += len(data)
                else:
                    ticket.bytes_down += len(data)
                    self.bytes_down += len(data)
                dst.write(data)
                await dst.drain()

        async with anyio.create_task_group() as tg:

            async def one_way(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
                try:
                    await copy(src, dst, up)
                except OSError:
                    pass  # a reset ends the tunnel like a close does
                finally:
                    # either side closing ends the tunnel (half-close is not needed by WhatsApp)
                    tg.cancel_scope.cancel()

            tg.start_soon(one_way, c_reader, u_writer, True)
            tg.start_soon(one_way, u_reader, c_writer, False)

    async def _resolve(self, host: str, port: int) -> list[tuple[int, str]]:
        loop = asyncio.get_running_loop()
        assert self._resolver is not None
        infos = await loop.run_in_executor(
            self._resolver,
            lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM),
        )
        out: list[tuple[int, str]] = []
        for family, _t, _p, _c, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6) and (family, str(sockaddr[0])) not in out:
                out.append((family, str(sockaddr[0])))
        if not out:
            raise RelayError(f"no address for {host}")
        return out

    async def _open(self, host: str, port: int, *, tls: ssl.SSLContext | None = None
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        last: Exception | None = None
        for _family, addr in await self._resolve(host, port):
            try:
                # a numeric address: asyncio does not touch the default executor
                if tls is not None:
                    return await asyncio.open_connection(addr, port, limit=_BUF, ssl=tls, server_hostname=host)
                return await asyncio.open_connection(addr, port, limit=_BUF)
            except OSError as exc:
                last = exc
        raise RelayError(str(last) if last else f"cannot connect to {host}:{port}")

    async def _dial(
        self, host: str, port: int, upstream: UpstreamProxy | None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if upstream is None:
            return await self._open(host, port)
        if upstream.scheme == "https":
            # TLS to the proxy itself (verified against upstream_tls), then CONNECT inside it
            reader, writer = await self._open(upstream.host, upstream.port, tls=self.upstream_tls)
        else:
            reader, writer = await self._open(upstream.host, upstream.port)
        try:
            if upstream.scheme == "socks5":
                await _socks5_connect(reader, writer, host, port, upstream)
            else:
                await _http_connect(reader, writer, host, port, upstream)
            return reader, writer
        except BaseException:
            _close(writer, True)
            raise


async def _http_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int,
                        upstream: UpstreamProxy) -> None:
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    req = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
    if upstream.auth is not None:
        token = base64.b64encode(upstream.auth.encode()).decode()
        req += f"Proxy-Authorization: Basic {token}\r\n"
    writer.write((req + "\r\n").encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit() or not 200 <= int(parts[1]) < 300:
        raise RelayError(f"upstream proxy refused: {status_line[:120]}")


_SOCKS5_REPLIES = {1: "general failure", 2: "not allowed by ruleset", 3: "network unreachable",
                   4: "host unreachable", 5: "connection refused", 6: "TTL expired",
                   7: "command not supported", 8: "address type not supported"}


async def _socks5_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int,
                          upstream: UpstreamProxy) -> None:
    """RFC 1928 CONNECT by name (the proxy resolves it), with RFC 1929 user/password when given."""
    methods = b"\x00\x02" if upstream.username is not None else b"\x00"
    writer.write(b"\x05" + bytes([len(methods)]) + methods)
    await writer.drain()
    version, method = await reader.readexactly(2)
    if version != 5:
        raise RelayError("upstream is not a SOCKS5 proxy")
    if method == 2 and upstream.username is not None:
        user, pw = upstream.username.encode(), (upstream.password or "").encode()
        writer.write(b"\x01" + bytes([len(user)]) + user + bytes([len(pw)]) + pw)
        await writer.drain()
        _ver, status = await reader.readexactly(2)
        if status != 0:
            raise RelayError("upstream SOCKS5 proxy refused the credentials")
    elif method != 0:
        raise RelayError("upstream SOCKS5 proxy accepts none of our auth methods")
    name = host.encode("idna") if not host.replace(".", "").isdigit() and ":" not in host else None
    if name is not None and len(name) <= 255:
        address = b"\x03" + bytes([len(name)]) + name
    else:
        try:
            address = b"\x01" + socket.inet_pton(socket.AF_INET, host)
        except OSError:
            address = b"\x04" + socket.inet_pton(socket.AF_INET6, host)
    writer.write(b"\x05\x01\x00" + address + port.to_bytes(2, "big"))
    await writer.drain()
    _ver, reply, _rsv, atyp = await reader.readexactly(4)
    if reply != 0:
        raise RelayError(f"upstream SOCKS5 proxy refused: {_SOCKS5_REPLIES.get(reply, f'code {reply}')}")
    bound = {1: 4, 4: 16}.get(atyp)
    if bound is None:
        if atyp != 3:
            raise RelayError("upstream SOCKS5 proxy sent a bad reply")
        bound = (await reader.readexactly(1))[0]
    await reader.readexactly(bound + 2)  # the bound address and port: not needed


# ---------------------------------------------------------------------- helpers


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("malformed request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return parts[0].upper(), parts[1], headers


def _token_of(proxy_authorization: str) -> str:
    scheme, _, value = proxy_authorization.partition(" ")
    if scheme.lower() != "basic":
        return ""
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("latin-1")
    except (binascii.Error, ValueError):
        return ""
    return decoded.partition(":")[0]


def _split_target(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError("CONNECT target must be host:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host:
        raise ValueError("empty CONNECT host")
    return host, int(port)


async def _reply(writer: asyncio.StreamWriter, status: bytes, extra: bytes = b"") -> None:
    writer.write(b"HTTP/1.1 " + status + b"\r\n" + extra + b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    try:
        await asyncio.wait_for(writer.drain(), 2.0)
    except (asyncio.TimeoutError, OSError):
        pass


def _close(writer: asyncio.StreamWriter, abort: bool) -> None:
    """Abort (drop buffers, close now) or close gracefully (flush, then FIN)."""
    transport = writer.transport
    try:
        if abort:
            transport.abort()
        else:
            transport.close()
    except Exception:  # noqa: BLE001
        pass
