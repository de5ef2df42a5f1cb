"""wa_worker.media: the SSRF-safe fetcher against a real loopback server, base64 decoding,
sniffing real files, and OGG/Opus conversion by the real ffmpeg."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import ipaddress
import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import web

from wa_worker.media import (
    FetchedMedia,
    MediaError,
    StorageError,
    decode_base64_to_file,
    duration_seconds,
    extension_for,
    fetch_to_file,
    infer_type,
    is_ogg_opus,
    is_public_address,
    redact_url,
    sniff_mimetype,
    to_ogg_opus,
)
from wa_worker.media.fetch import IPAddress

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
CAP = 64 * 1024
PAYLOAD = os.urandom(40_000)


def need_ffmpeg() -> None:
    """Skip locally, fail in CI (scripts/test.sh installs ffmpeg there), like tests/pg_helpers.py."""
    if shutil.which("ffmpeg") and shutil.which("ffprobe"):
        return
    reason = "ffmpeg/ffprobe not on PATH (apt-get install ffmpeg)"
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: scripts/test.sh installs it)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests must never reach past loopback, even if the SSRF check regresses:
    any connect to another address fails the test instead of leaving the machine."""
    real_connect = socket.socket.connect

    def guarded(sock: socket.socket, address: Any) -> Any:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            if not ipaddress.ip_address(host.split("%", 1)[0]).is_loopback:
                raise AssertionError(f"test tried to connect to non-loopback {host}: the SSRF check let it through")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def files_in(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


# ------------------------------------------------------------------ loopback media server


@dataclass
class MediaServer:
    connections: int = 0
    requests: list[str] = field(default_factory=list)
    url: str = ""
    port: int = 0
    _runner: web.AppRunner | None = None
    _server: asyncio.base_events.Server | None = None

    async def start(self) -> MediaServer:
        app = web.Application()
        app.router.add_get("/file/{name}", self._file)
        app.router.add_get("/redirect/{n}", self._redirect)
        app.router.add_get("/to", self._to)
        app.router.add_get("/big", self._big)
        app.router.add_get("/big-chunked", self._big_chunked)
        app.router.add_get("/drip", self._drip)
        app.router.add_get("/slow-header", self._slow_header)
        app.router.add_get("/status/{code}", self._status)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        handler = self._runner.server
        assert handler is not None

        def factory() -> asyncio.BaseProtocol:
            self.connections += 1
            return handler()

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(factory, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def stop(self) -> None:
        assert self._server is not None and self._runner is not None
        self._server.close()
        await self._runner.cleanup()

    async def _file(self, request: web.Request) -> web.Response:
        self.requests.append(request.path)
        headers = {}
        if request.query.get("cd"):
            headers["Content-Disposition"] = f'attachment; filename="{request.query["cd"]}"'
        return web.Response(body=PAYLOAD, content_type="audio/mpeg", headers=headers)

    async def _redirect(self, request: web.Request) -> web.Response:
        self.requests.append(request.path)
        n = int(request.match_info["n"])
        target = "/file/song.mp3" if n <= 1 else f"/redirect/{n - 1}"  # n redirects
        raise web.HTTPFound(target)

    async def _to(self, request: web.Request) -> web.Response:
        self.requests.append(request.path)
        raise web.HTTPFound(request.query["loc"])

    async def _big(self, request: web.Request) -> web.Response:
        self.requests.append(request.path)
        return web.Response(body=b"x" * (CAP + 1))

    async def _big_chunked(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            for _ in range(CAP // 4096 + 8):
                await resp.write(b"y" * 4096)
        except ConnectionError:
            pass
        return resp

    async def _drip(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        resp = web.StreamResponse(headers={"Content-Length": "1000"})
        await resp.prepare(request)
        try:
            for _ in range(30):  # bounded: 3 s at most
                await resp.write(b"z")
                await asyncio.sleep(0.1)
        except ConnectionError:
            pass
        return resp

    async def _slow_header(self, request: web.Request) -> web.Response:
        self.requests.append(request.path)
        await asyncio.sleep(3)
        return web.Response(body=b"late")

    async def _status(self, request: web.Request) -> web.Response:
        self.requests.append(request.path)
        return web.Response(status=int(request.match_info["code"]), text="nope")


pytestmark = pytest.mark.anyio


@pytest.fixture
async def server() -> AsyncIterator[MediaServer]:
    s = await MediaServer().start()
    try:
        yield s
    finally:
        await s.stop()


async def fetch(url: str, dest: Path, **kw: Any) -> FetchedMedia:
    args: dict[str, Any] = dict(max_bytes=CAP, timeout_s=5.0, allow_private=True)
    args.update(kw)
    return await fetch_to_file(url, dest, **args)


async def refused(url: str, dest: Path, code: str = "media_refused", **kw: Any) -> MediaError:
    with pytest.raises(MediaError) as info:
        await fetch(url, dest, **kw)
    assert info.value.code == code, info.value
    assert files_in(dest) == [], "a partial file was left behind"
    return info.value


# ------------------------------------------------------------------ fetch: success and redirects


async def test_fetch_streams_to_a_private_file_with_hash_type_and_name(server: MediaServer, tmp_path: Path) -> None:
    dest = tmp_path / "media"
    got = await fetch(f"{server.url}/file/x.bin?cd=voice%20note.mp3", dest)
    assert got.path.parent == dest and got.path.read_bytes() == PAYLOAD
    assert got.size == len(PAYLOAD) and got.sha256 == hashlib.sha256(PAYLOAD).hexdigest()
    assert got.content_type == "audio/mpeg" and got.filename == "voice note.mp3"
    assert stat.S_IMODE(got.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(dest.stat().st_mode) == 0o700
    # without Content-Disposition the name comes from the URL path
    again = await fetch(f"{server.url}/file/report.pdf?token=1", dest)
    assert again.filename == "report.pdf"


@pytest.mark.parametrize("hops", [1, 3])
async def test_fetch_follows_up_to_three_redirects(server: MediaServer, tmp_path: Path, hops: int) -> None:
    got = await fetch(f"{server.url}/redirect/{hops}", tmp_path)
    assert got.path.read_bytes() == PAYLOAD
    assert len(server.requests) == hops + 1


async def test_fetch_refuses_a_fourth_redirect(server: MediaServer, tmp_path: Path) -> None:
    err = await refused(f"{server.url}/redirect/4", tmp_path, code="media_fetch_failed")
    assert "more than 3" in err.message
    assert server.requests == ["/redirect/4", "/redirect/3", "/redirect/2", "/redirect/1"]


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://127.0.0.1:70/"])
async def test_fetch_refuses_redirects_to_other_schemes(server: MediaServer, tmp_path: Path, target: str) -> None:
    err = await refused(f"{server.url}/to?loc={target}", tmp_path)
    assert "http or https" in err.message


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.mp3", "data:text/plain,hi", "/rel/x"])
async def test_fetch_refuses_non_http_urls(tmp_path: Path, url: str) -> None:
    await refused(url, tmp_path, allow_private=False)


def only_first_loopback(ip: IPAddress) -> bool:
    """A policy for the tests: the server's 127.0.0.1 counts as public, nothing else private does."""
    return ip == ipaddress.ip_address("127.0.0.1") or is_public_address(ip)


@pytest.mark.parametrize(
    "target",
    ["http://127.0.0.2:{port}/file/a", "http://169.254.169.254/latest/meta-data/", "http://10.1.2.3/x",
     "http://[::ffff:192.168.0.1]/x", "http://2130706434:{port}/file/a"],
)
async def test_a_redirect_to_a_private_address_is_refused_before_connecting(
    server: MediaServer, tmp_path: Path, target: str
) -> None:
    loc = target.format(port=server.port)
    err = await refused(
        f"{server.url}/to?loc={loc}", tmp_path, allow_private=False, address_policy=only_first_loopback
    )
    assert "non-public address" in err.message and "MEDIA_ALLOW_PRIVATE" in err.message
    assert server.requests == ["/to"] and server.connections == 1


# ------------------------------------------------------------------ fetch: SSRF


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "localhost", "[::1]", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0",
     "[::]", "2130706433", "0177.0.0.1", "0x7f.0.0.1", "127.1", "[::ffff:127.0.0.1]", "[::127.0.0.1]",
     "[fe80::1]", "224.0.0.1", "100.64.0.1", "[fd00::1]"],
)
async def test_private_addresses_are_refused_before_any_connection(
    server: MediaServer, tmp_path: Path, host: str
) -> None:
    started = time.monotonic()
    err = await refused(f"http://{host}:{server.port}/file/a.mp3", tmp_path, allow_private=False)
    assert "MEDIA_ALLOW_PRIVATE" in err.message
    assert server.connections == 0 and server.requests == []
    assert time.monotonic() - started < 2


async def test_a_cancelled_fetch_leaves_no_partial_file(server: MediaServer, tmp_path: Path) -> None:
    with anyio.move_on_after(0.4) as scope:
        await fetch(f"{server.url}/drip", tmp_path)
    assert scope.cancelled_caught
    assert server.requests == ["/drip"] and files_in(tmp_path) == []


async def test_allow_private_reaches_loopback(server: MediaServer, tmp_path: Path) -> None:
    got = await fetch(f"http://localhost:{server.port}/file/a.mp3", tmp_path, allow_private=True)
    assert got.size == len(PAYLOAD)


def test_public_address_policy() -> None:
    for good in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"):
        assert is_public_address(ipaddress.ip_address(good)), good
    for bad in ("127.0.0.1", "10.0.0.1", "172.31.255.255", "192.168.0.1", "169.254.169.254", "0.0.0.0", "::",
                "::1", "::ffff:10.0.0.1", "2002:7f00:1::", "fe80::1", "fc00::1", "ff02::1", "240.0.0.1",
                "255.255.255.255", "100.64.0.1", "192.0.2.1", "198.18.0.1", "2001:db8::1", "2001::1"):
        assert not is_public_address(ipaddress.ip_address(bad)), bad


# ------------------------------------------------------------------ fetch: size, time, errors


async def test_content_length_over_the_cap_is_refused(server: MediaServer, tmp_path: Path) -> None:
    err = await refused(f"{server.url}/big", tmp_path, code="media_too_large")
    assert f"{CAP + 1} bytes" in err.message and "MEDIA_MAX_BYTES" in err.message


async def test_a_chunked_body_over_the_cap_is_aborted(server: MediaServer, tmp_path: Path) -> None:
    await refused(f"{server.url}/big-chunked", tmp_path, code="media_too_large")


async def test_a_dripping_body_hits_the_total_deadline(server: MediaServer, tmp_path: Path) -> None:
    started = time.monotonic()
    err = await refused(f"{server.url}/drip", tmp_path, code="media_fetch_failed", timeout_s=0.6)
    assert 0.5 < time.monotonic() - started < 2
    assert "longer than 0.6 s" in err.message


async def test_a_slow_header_hits_the_total_deadline(server: MediaServer, tmp_path: Path) -> None:
    started = time.monotonic()
    await refused(f"{server.url}/slow-header", tmp_path, code="media_fetch_failed", timeout_s=0.5)
    assert time.monotonic() - started < 2


async def test_the_deadline_covers_redirects_too(server: MediaServer, tmp_path: Path) -> None:
    await refused(f"{server.url}/to?loc=/slow-header", tmp_path, code="media_fetch_failed", timeout_s=0.5)
    assert server.requests == ["/to", "/slow-header"]


async def test_errors_say_what_happened_without_secrets(server: MediaServer, tmp_path: Path) -> None:
    url = f"http://alice:s3cret@127.0.0.1:{server.port}/status/404?token=abcdef&sig=xyz#frag"
    err = await refused(url, tmp_path, code="media_fetch_failed")
    assert "HTTP 404" in err.message
    for secret in ("alice", "s3cret", "abcdef", "xyz", "frag"):
        assert secret not in str(err), str(err)
    assert "token=***" in err.message
    # a closed port
    err = await refused(f"http://127.0.0.1:{closed_port()}/x?key=hunter2", tmp_path, code="media_fetch_failed")
    assert "hunter2" not in str(err) and "could not" in err.message


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_disk_problem_is_a_storage_error_not_the_senders_fault(server: MediaServer, tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the media folder should be")
    with pytest.raises(StorageError):
        await fetch(f"{server.url}/file/a.mp3", blocked / "media")
    with pytest.raises(StorageError):
        decode_base64_to_file("QUJD", blocked / "media", max_bytes=CAP)


def test_redact_url() -> None:
    assert redact_url("https://u:p@h.example/a/b.jpg?x=1&y=2#f") == "https://***@h.example/a/b.jpg?x=***&y=***"
    assert redact_url("https://h.example/a.jpg") == "https://h.example/a.jpg"


# ------------------------------------------------------------------ base64


def test_base64_plain_data_url_urlsafe_and_wrapped(tmp_path: Path) -> None:
    raw = os.urandom(3000) + b"\xfb\xff"
    cases: list[tuple[str | bytes, str | None]] = [
        (base64.b64encode(raw).decode(), None),
        ("data:image/png;base64," + base64.b64encode(raw).decode(), "image/png"),
        (base64.urlsafe_b64encode(raw).decode().rstrip("="), None),
        (base64.encodebytes(raw).decode(), None),  # 76-character lines
        (base64.b64encode(raw), None),  # bytes
    ]
    for text, ctype in cases:
        got = decode_base64_to_file(text, tmp_path, max_bytes=CAP)
        assert got.path.read_bytes() == raw and got.size == len(raw) and got.content_type == ctype
        assert got.sha256 == hashlib.sha256(raw).hexdigest()
        assert stat.S_IMODE(got.path.stat().st_mode) == 0o600
        got.path.unlink()


@pytest.mark.parametrize(
    "text", ["not base64!", "QUJD*", "QQ==QUJD", "Q", "", "   ", "data:text/plain,hello", "data:image/png;base64",
             "QUJD" * 100 + "é"],
)
def test_base64_invalid_is_refused_and_leaves_nothing(tmp_path: Path, text: str) -> None:
    with pytest.raises(MediaError) as info:
        decode_base64_to_file(text, tmp_path, max_bytes=CAP)
    assert info.value.code == "media_invalid"
    assert files_in(tmp_path) == []


def test_base64_oversized_is_refused_before_decoding(tmp_path: Path) -> None:
    exact = base64.b64encode(b"a" * CAP).decode()
    assert decode_base64_to_file(exact, tmp_path, max_bytes=CAP).size == CAP  # the cap itself is fine
    shutil.rmtree(tmp_path / "x", ignore_errors=True)
    over = "QUJD" * (CAP // 3 + 1)  # valid base64 decoding to CAP+3 bytes
    with pytest.raises(MediaError) as info:
        decode_base64_to_file(over, tmp_path / "x", max_bytes=CAP)
    assert info.value.code == "media_too_large" and "MEDIA_MAX_BYTES" in info.value.message
    assert not (tmp_path / "x").exists(), "refused before creating anything"
    # invalid characters far beyond the cap are refused for size first, never decoded
    with pytest.raises(MediaError) as info:
        decode_base64_to_file("!" * (CAP * 2), tmp_path / "x", max_bytes=CAP)
    assert info.value.code == "media_too_large"


# ------------------------------------------------------------------ sniffing


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from PIL import Image

    d = tmp_path_factory.mktemp("samples")
    out: dict[str, Path] = {}
    img = Image.new("RGB", (8, 8), (200, 10, 10))
    for fmt, name in (("PNG", "png"), ("JPEG", "jpg"), ("PDF", "pdf"), ("WEBP", "webp")):
        buf = io.BytesIO()
        img.save(buf, fmt)
        (d / f"sample.{name}").write_bytes(buf.getvalue())
        out[name] = d / f"sample.{name}"
    out["txt"] = d / "sample.txt"
    out["txt"].write_text("a,b\n1,2\n")
    out["random"] = d / "random.bin"
    out["random"].write_bytes(bytes([0x00, 0x9F, 0x13, 0x77]) * 64)
    if shutil.which("ffmpeg"):
        for name in ("mp3", "ogg"):
            target = d / f"sample.{name}"
            codec = ["-c:a", "libopus"] if name == "ogg" else []
            subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "sine=d=1", *codec,
                            str(target)], check=True, timeout=30)
            out[name] = target
    return out


def test_sniff_real_files(samples: dict[str, Path]) -> None:
    assert sniff_mimetype(samples["png"], None, None) == "image/png"
    assert sniff_mimetype(samples["jpg"], None, None) == "image/jpeg"
    assert sniff_mimetype(samples["pdf"], None, None) == "application/pdf"
    assert sniff_mimetype(samples["webp"], None, None) == "image/webp"
    # the bytes win over a declared type of another family
    assert sniff_mimetype(samples["png"], "audio/mpeg", "song.mp3") == "image/png"
    # a generic sniff takes a more specific declared type or file name of the same family
    assert sniff_mimetype(samples["txt"], "text/csv; charset=utf-8", None) == "text/csv"
    assert sniff_mimetype(samples["txt"], None, "table.csv") == "text/csv"
    assert sniff_mimetype(samples["txt"], "image/png", None) == "text/plain"
    # inconclusive bytes: declared, then the file name, then octet-stream
    assert sniff_mimetype(samples["random"], "application/x-thing", "a.pdf") == "application/x-thing"
    assert sniff_mimetype(samples["random"], None, "a.pdf") == "application/pdf"
    assert sniff_mimetype(samples["random"], "application/octet-stream", None) == "application/octet-stream"


def test_sniff_audio(samples: dict[str, Path]) -> None:
    need_ffmpeg()
    assert sniff_mimetype(samples["mp3"], None, None) == "audio/mpeg"
    assert sniff_mimetype(samples["ogg"], None, None) == "audio/ogg"
    assert is_ogg_opus(samples["ogg"]) and not is_ogg_opus(samples["mp3"])


def test_infer_type_and_extensions() -> None:
    assert infer_type("image/jpeg") == "image" and infer_type("IMAGE/PNG; q=1") == "image"
    assert infer_type("image/webp") == "image"  # a sticker only when asked for
    assert infer_type("video/mp4") == "video" and infer_type("video/webm") == "document"
    assert infer_type("audio/mpeg") == "audio" and infer_type("audio/ogg") == "audio"
    assert infer_type("audio/x-wav") == "document" and infer_type("image/svg+xml") == "document"
    assert infer_type("application/pdf") == "document" and infer_type("application/octet-stream") == "document"
    assert extension_for("image/jpeg") == ".jpg" and extension_for("audio/mpeg") == ".mp3"
    assert extension_for("audio/ogg; codecs=opus") == ".ogg" and extension_for("application/pdf") == ".pdf"
    assert extension_for("application/x-nothing-known") == ".bin"


# ------------------------------------------------------------------ voice notes


def ffprobe_codec(path: Path) -> str:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries", "stream=codec_name,channels",
         "-of", "default=nw=1", str(path)], check=True, capture_output=True, text=True, timeout=15,
    ).stdout
    return out.strip()


async def test_mp3_becomes_ogg_opus(samples: dict[str, Path], tmp_path: Path) -> None:
    need_ffmpeg()
    before = samples["mp3"].read_bytes()
    out = await to_ogg_opus(samples["mp3"], tmp_path / "voice")
    assert out.parent == tmp_path / "voice" and out.suffix == ".ogg"
    assert ffprobe_codec(out) == "codec_name=opus\nchannels=1"
    assert is_ogg_opus(out) and stat.S_IMODE(out.stat().st_mode) == 0o600
    head = out.read_bytes()[:64]
    opus_head = head.index(b"OpusHead")
    assert int.from_bytes(head[opus_head + 12 : opus_head + 16], "little") == 16000  # input rate, like WhatsApp's
    assert samples["mp3"].read_bytes() == before
    length = await duration_seconds(out)
    assert length is not None and 0.9 < length < 1.2


async def test_ogg_opus_is_kept_as_is(samples: dict[str, Path], tmp_path: Path) -> None:
    need_ffmpeg()
    assert await to_ogg_opus(samples["ogg"], tmp_path) == samples["ogg"]
    assert files_in(tmp_path) == []


async def test_garbage_fails_conversion_and_leaves_nothing(samples: dict[str, Path], tmp_path: Path) -> None:
    need_ffmpeg()
    with pytest.raises(MediaError) as info:
        await to_ogg_opus(samples["random"], tmp_path / "out")
    assert info.value.code == "media_conversion_failed" and "ffmpeg could not convert" in info.value.message
    assert files_in(tmp_path / "out") == []
    assert await duration_seconds(samples["random"]) is None


@pytest.fixture
def no_ffmpeg_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    empty = tmp_path / "emptybin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    yield


async def test_without_ffmpeg_the_reason_says_what_to_install(
    samples: dict[str, Path], tmp_path: Path, no_ffmpeg_path: None
) -> None:
    assert shutil.which("ffmpeg") is None
    with pytest.raises(MediaError) as info:
        await to_ogg_opus(samples["png"], tmp_path / "out")
    assert info.value.code == "media_conversion_failed"
    assert info.value.message == (
        "voice notes need ffmpeg to convert image/png to OGG/Opus: install ffmpeg (the Docker image has it)"
    )
    assert files_in(tmp_path / "out") == []
    assert await duration_seconds(samples["png"]) is None


async def test_a_hung_ffmpeg_is_killed_at_the_deadline(samples: dict[str, Path], tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    fake = tmp_path / "ffmpeg"
    fake.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 30\n")
    fake.chmod(0o755)
    started = time.monotonic()
    with pytest.raises(MediaError) as info:
        await to_ogg_opus(samples["png"], tmp_path / "out", timeout_s=0.5, ffmpeg=str(fake))
    assert time.monotonic() - started < 3
    assert info.value.code == "media_conversion_failed" and "longer than 0.5 s" in info.value.message
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert files_in(tmp_path / "out") == []


async def test_cancelling_a_conversion_kills_ffmpeg(samples: dict[str, Path], tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    fake = tmp_path / "ffmpeg"
    fake.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 30\n")
    fake.chmod(0o755)
    with anyio.move_on_after(0.5):
        await to_ogg_opus(samples["png"], tmp_path / "out", ffmpeg=str(fake))
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert files_in(tmp_path / "out") == []


def test_the_image_and_the_test_script_install_ffmpeg() -> None:
    root = Path(__file__).resolve().parent.parent
    apt_line = next(ln for ln in (root / "Dockerfile").read_text().splitlines() if "apt-get install" in ln)
    assert "ffmpeg" in apt_line.split()
    # scripts/test.sh sources scripts/_test_prereqs.sh, which installs it as root
    assert "source scripts/_test_prereqs.sh" in (root / "scripts" / "test.sh").read_text()
    prereqs = (root / "scripts" / "_test_prereqs.sh").read_text()
    assert 'apt-get install -y -qq --no-install-recommends "$pkg"' in prereqs
    assert "_can_apt && _apt_install ffmpeg" in prereqs
