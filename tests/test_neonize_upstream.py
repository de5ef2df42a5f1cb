"""Per-instance upstream proxies with the real neonize library, offline: the value
the edge proxy gives (``proxy_url``) reaches the Go client's dial, through the
loopback CONNECT relay, to an http, https or socks5 proxy on loopback that records
what it was asked (issue #12). Credentials never appear in logs or statuses."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import make_settings, running_worker, wait_until
from tests.neonize_helpers import Recorder
from wa_worker.backends.base import BackendError
from wa_worker.backends.neonize import NeonizeBackend
from wa_worker.backends.neonize.connect_relay import ConnectRelay
from wa_worker.instances.settings import InstanceSettingsBook
from wa_worker.upstream import proxy_choice

pytestmark = [pytest.mark.neonize]

PW = "s3cret-pr0xy"


class RecordingConnectProxy:
    """An HTTP CONNECT proxy on loopback (optionally TLS) that records each request head and
    refuses it (502): enough to prove where a dial went and with which credentials."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.heads: list[str] = []
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> "RecordingConnectProxy":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.heads.append((await reader.readuntil(b"\r\n\r\n")).decode("latin-1"))
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    def auth_of(self, head: str) -> str | None:
        for line in head.split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "proxy-authorization":
                return base64.b64decode(value.strip().split(" ", 1)[1]).decode()
        return None

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()


class Socks5Proxy:
    """A SOCKS5 proxy on loopback (RFC 1928/1929) that records the credentials and target,
    then connects the tunnel to ``forward_to`` (or refuses with "connection refused")."""

    def __init__(self, forward_to: int | None = None) -> None:
        self.forward_to = forward_to
        self.requests: list[tuple[str | None, str | None, str, int]] = []  # user, password, host, port
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> "Socks5Proxy":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            _ver, n = await reader.readexactly(2)
            methods = await reader.readexactly(n)
            user = pw = None
            if 2 in methods:
                writer.write(b"\x05\x02")
                _v, ulen = await reader.readexactly(2)
                user = (await reader.readexactly(ulen)).decode()
                plen = (await reader.readexactly(1))[0]
                pw = (await reader.readexactly(plen)).decode()
                writer.write(b"\x01\x00")
            else:
                writer.write(b"\x05\x00")
            _v, _cmd, _rsv, atyp = await reader.readexactly(4)
            if atyp == 3:
                host = (await reader.readexactly((await reader.readexactly(1))[0])).decode()
            else:
                raw = await reader.readexactly(4 if atyp == 1 else 16)
                host = ".".join(str(b) for b in raw) if atyp == 1 else raw.hex()
            port = int.from_bytes(await reader.readexactly(2), "big")
            self.requests.append((user, pw, host, port))
            if self.forward_to is None:
                writer.write(b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00")
                await writer.drain()
                return
            ur, uw = await asyncio.open_connection("127.0.0.1", self.forward_to)
            writer.write(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x00")
            await writer.drain()

            async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                try:
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                except ConnectionError:
                    pass
                finally:
                    dst.close()

            await asyncio.gather(copy(reader, uw), copy(ur, writer))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()


async def _echo_server() -> tuple[asyncio.AbstractServer, int]:
    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()

    srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def _tunnel(relay: ConnectRelay, token: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    r, w = await asyncio.open_connection("127.0.0.1", relay.port)
    auth = base64.b64encode(f"{token}:x".encode()).decode()
    w.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic {auth}\r\n\r\n".encode())
    return r, w, await r.readuntil(b"\r\n\r\n")


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the https proxy's certificate")
    cert, key = tmp_path / "proxy.crt", tmp_path / "proxy.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_relay_tunnels_through_socks5_and_https_upstreams(tmp_path: Path) -> None:
    """The relay's own dial: SOCKS5 with user/password (the name resolved by the proxy),
    and CONNECT inside TLS to an https proxy verified against its certificate."""
    cert, key = _self_signed(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    client_tls = ssl.create_default_context(cafile=str(cert))

    async def main() -> None:
        echo, echo_port = await _echo_server()
        async with ConnectRelay(dial_timeout_s=5, allowed_ports=None, upstream_tls=client_tls) as relay:
            async with Socks5Proxy(forward_to=echo_port) as socks:
                t = relay.issue("s", upstream=f"socks5://ops:{PW}@127.0.0.1:{socks.port}")
                r, w, head = await _tunnel(relay, t.token, echo_port)
                assert head.startswith(b"HTTP/1.1 200"), head
                w.write(b"via-socks5")
                assert await r.readexactly(10) == b"via-socks5"
                assert socks.requests == [("ops", PW, "127.0.0.1", echo_port)]
                w.close()
            async with Socks5Proxy(forward_to=None) as refusing:
                t = relay.issue("s2", upstream=f"socks5://127.0.0.1:{refusing.port}")
                _, w, head = await _tunnel(relay, t.token, echo_port)
                assert head.startswith(b"HTTP/1.1 502") and "connection refused" in (t.last_error or "")
                assert refusing.requests == [(None, None, "127.0.0.1", echo_port)]
                w.close()
            async with RecordingConnectProxy(tls=server_tls) as https_proxy:
                t = relay.issue("h", upstream=f"https://ops:{PW}@localhost:{https_proxy.port}")
                _, w, head = await _tunnel(relay, t.token, echo_port)
                assert head.startswith(b"HTTP/1.1 502")  # the recording proxy refuses: it was reached over TLS
                assert https_proxy.heads[0].startswith(f"CONNECT 127.0.0.1:{echo_port} HTTP/1.1")
                assert https_proxy.auth_of(https_proxy.heads[0]) == f"ops:{PW}"
                w.close()
                untrusted = ConnectRelay(dial_timeout_s=5, allowed_ports=None)  # system CAs: refused
                async with untrusted:
                    t2 = untrusted.issue("h2", upstream=f"https://localhost:{https_proxy.port}")
                    _, w2, head = await _tunnel(untrusted, t2.token, echo_port)
                    assert head.startswith(b"HTTP/1.1 502") and "CERTIFICATE_VERIFY_FAILED" in (t2.last_error or "")
                    assert len(https_proxy.heads) == 1
                    w2.close()
        echo.close()

    asyncio.run(main())


def test_neonize_dials_through_the_instance_socks5_proxy(tmp_path: Path) -> None:
    """The per-instance value (the settings book the worker fills from the edge proxy)
    wins over the backend-wide one; a bad value fails the connect, without credentials."""
    async def main() -> None:
        async with Socks5Proxy(forward_to=None) as socks, RecordingConnectProxy() as global_proxy:
            backend = NeonizeBackend(tmp_path / "auth", connect_timeout_s=10, upstream_proxy=f"http://127.0.0.1:{global_proxy.port}")
            book = InstanceSettingsBook(lambda _iid, _s: None)
            backend.instance_proxy = book.proxy_for
            book.apply("acme", None, proxy=proxy_choice(f"socks5://ops:{PW}@127.0.0.1:{socks.port}"))
            book.apply("bad", None, proxy=proxy_choice(f"ftp://ops:{PW}@127.0.0.1:21"))
            async with backend:
                session = await backend.open_session("acme", Recorder())
                await session.connect()
                deadline = time.monotonic() + 10
                while not socks.requests:
                    assert time.monotonic() < deadline, "the Go client's dial never reached the socks5 proxy"
                    await asyncio.sleep(0.05)
                user, pw, host, port = socks.requests[0]
                assert (user, pw) == ("ops", PW)
                assert host.endswith("whatsapp.net") or host.endswith("whatsapp.com"), host
                assert port in (443, 5222, 80)
                assert global_proxy.heads == []  # the instance's own proxy, not the backend-wide one
                bad = await backend.open_session("bad", Recorder())
                with pytest.raises(BackendError) as info:
                    await bad.connect()
                assert "scheme 'ftp' is not supported" in str(info.value) and PW not in str(info.value)
                await session.close()
                await bad.close()

    asyncio.run(main())


@pytest.mark.anyio
@pytest.mark.slow
async def test_worker_dials_through_the_discovery_items_proxy_url(proxy, tmp_path, caplog):
    """The real daemon and neonize: the proxy_url of the discovery item reaches the Go dial
    (the CONNECT line and its Proxy-Authorization), and the password nowhere else."""
    caplog.set_level(logging.DEBUG)
    async with RecordingConnectProxy() as upstream:
        proxy.add_instance("acme", proxy_url=f"http://ops:{PW}@127.0.0.1:{upstream.port}")
        settings = make_settings(tmp_path, proxy.url, WA_BACKEND="neonize", CONNECT_TIMEOUT_S=5)
        async with running_worker(settings) as w:
            await wait_until(lambda: upstream.heads, timeout=20, what="a CONNECT at the instance's proxy")
            await wait_until(lambda: any(s.get("reason") for s in proxy.statuses_of("acme")), timeout=20,
                             what="the refused dial reported")
            assert w.manager.instance_settings.proxy_shown("acme") == f"http://***@127.0.0.1:{upstream.port}"
        head = upstream.heads[0]
        target = head.split(" ")[1]
        assert head.startswith("CONNECT ") and "whatsapp" in target and target.rsplit(":", 1)[1] in ("443", "5222")
        assert upstream.auth_of(head) == f"ops:{PW}"
    assert PW not in caplog.text and PW not in json.dumps(proxy.statuses)
