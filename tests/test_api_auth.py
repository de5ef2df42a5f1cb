"""The direct API's door (issue #15): API tokens, the rate limit, the error shape, and
that neither credential opens the other's routes."""

from __future__ import annotations

import signal
from pathlib import Path

import aiohttp
import anyio
import pytest

from wa_worker.api.auth import RateLimiter
from wa_worker.config import ConfigError, load_settings

from tests.conftest import SECRET, FakeClock, make_settings, running_worker, serving
from tests.fakeproxy import FakeProxy
from tests.proc import ROOT, start_worker, worker_env

TOKEN = "api-token-0123456789abcdef"
OTHER = "api-token-rotated-fedcba9876"

pytestmark = pytest.mark.anyio


async def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], object]:
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers or {}) as resp:
        body = await resp.json(content_type=None) if resp.content_type == "application/json" else await resp.text()
        return resp.status, dict(resp.headers), body


async def test_api_token_required_and_distinct_from_worker_secret(tmp_path: Path) -> None:
    proxy = FakeProxy()
    async with serving(proxy.app()) as url:
        settings = make_settings(tmp_path, url, API_TOKEN=f"{TOKEN}, {OTHER}")
        async with running_worker(settings) as worker:
            base = f"http://127.0.0.1:{worker.port}"
            for headers in ({}, {"Authorization": f"Bearer {SECRET}"}, {"x-api-key": SECRET},
                            {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"Basic {TOKEN}"},
                            {"x-api-key": TOKEN[:-1]}):
                status, resp_headers, body = await _get(f"{base}/api/nothing-here", headers)
                assert status == 401, headers
                assert body == {"error": {"code": "unauthorized", "message": body["error"]["message"]}}  # type: ignore[index]
                assert TOKEN not in str(body) and SECRET not in str(body)
                assert resp_headers["WWW-Authenticate"].startswith("Bearer")
            # both tokens of a rotation work, by either header; a route that does not exist is the API's 404
            for headers in ({"Authorization": f"Bearer {TOKEN}"}, {"x-api-key": OTHER}):
                status, _, body = await _get(f"{base}/api/nothing-here", headers)
                assert status == 404
                assert body["error"]["code"] == "not_found"  # type: ignore[index]
            # an API token opens nothing outside /api/, even through a dot segment
            for path in ("/metrics", "/api/../metrics", "/api/%2e%2e/metrics", "/simulator/instances"):
                status, _, _ = await _get(f"{base}{path}", {"Authorization": f"Bearer {TOKEN}"})
                assert status in (401, 404), path
                assert status != 200
            status, _, _ = await _get(f"{base}/metrics", {"Authorization": f"Bearer {SECRET}"})
            assert status == 200


async def test_without_api_token_the_routes_do_not_exist(tmp_path: Path) -> None:
    proxy = FakeProxy()
    async with serving(proxy.app()) as url:
        async with running_worker(make_settings(tmp_path, url)) as worker:
            base = f"http://127.0.0.1:{worker.port}"
            status, _, _ = await _get(f"{base}/api/instances", {"Authorization": f"Bearer {TOKEN}"})
            assert status == 401  # the worker secret's door, not an API
            status, _, _ = await _get(f"{base}/api/instances", {"Authorization": f"Bearer {SECRET}"})
            assert status == 404


async def test_rate_limit_per_token_with_retry_after(tmp_path: Path) -> None:
    proxy = FakeProxy()
    async with serving(proxy.app()) as url:
        settings = make_settings(tmp_path, url, API_TOKEN=f"{TOKEN},{OTHER}", API_RATE_PER_MINUTE=6)
        async with running_worker(settings) as worker:
            base = f"http://127.0.0.1:{worker.port}"
            mine = {"x-api-key": TOKEN}
            assert (await _get(f"{base}/api/x", mine))[0] == 404  # the burst: a sixth of 6
            status, headers, body = await _get(f"{base}/api/x", mine)
            assert status == 429 and 9 <= int(headers["Retry-After"]) <= 10
            assert body["error"]["code"] == "rate_limited"  # type: ignore[index]
            # the other token has its own bucket; a wrong token is refused before it is counted
            assert (await _get(f"{base}/api/x", {"x-api-key": OTHER}))[0] == 404
            assert (await _get(f"{base}/api/x", {"x-api-key": "wrong-token-0123456789"}))[0] == 401


def test_rate_limiter_refills_at_its_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(60, clock)
    assert [limiter.take(0) for _ in range(10)] == [0.0] * 10
    assert limiter.take(0) == pytest.approx(1.0)
    clock.now += 0.5
    assert limiter.take(0) == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.take(0) == 0.0
    clock.now += 3600  # a long quiet spell refills only the burst
    assert sum(limiter.take(0) == 0.0 for _ in range(20)) == 10


@pytest.mark.parametrize("value, problem", [
    ("short-token", "at least 16"),
    (f"{TOKEN},tiny", "at least 16"),
    ("with space in the token!!", "at least 16"),
    (SECRET, "must differ from WORKER_SECRET"),
])
def test_api_token_settings_refused(value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(EDGE_BASE_URL="http://127.0.0.1:9", WORKER_SECRET=SECRET, API_TOKEN=value)
    assert problem in str(info.value) and "API_TOKEN" in str(info.value)
    assert value not in str(info.value)


def test_empty_api_token_is_off(tmp_path: Path) -> None:
    assert make_settings(tmp_path, "http://127.0.0.1:9", API_TOKEN="  ").api_tokens == ()


async def test_the_door_of_the_real_process(tmp_path: Path) -> None:
    """The real ``wa-worker`` process: every wrong credential is a 401 with the error shape, the
    right ones get in, the rate limit answers 429, the door's counters show in /health and
    /metrics, and no token reaches the log."""
    proxy = await FakeProxy().start()
    env = worker_env(tmp_path, proxy.url, API_TOKEN=f"{TOKEN},{OTHER}", API_RATE_PER_MINUTE=60, LOG_LEVEL="DEBUG")
    log_path = tmp_path / "worker.log"
    proc = start_worker(env, ROOT, log_path)
    base = f"http://127.0.0.1:{env['PORT']}"
    try:
        async with aiohttp.ClientSession() as http:
            with anyio.fail_after(20):
                while True:
                    try:
                        async with http.get(f"{base}/health") as resp:
                            if resp.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    assert proc.poll() is None, log_path.read_text()
                    await anyio.sleep(0.05)
            wrong = ({}, {"Authorization": f"Bearer {SECRET}"}, {"x-api-key": SECRET}, {"x-api-key": TOKEN.upper()},
                     {"Authorization": "Bearer " + "x" * 4_000}, {"Authorization": f"Bearer {TOKEN}\u00e9"})
            for headers in wrong:
                status, _, body = await _get(f"{base}/api/instances", headers)
                assert status == 401 and body["error"]["code"] == "unauthorized", (headers, body)  # type: ignore[index]
            status, _, _ = await _get(f"{base}/api/instances", {"Authorization": "Bearer " + "x" * 10_000})
            assert status == 400  # past aiohttp's 8 KiB header line: refused before any route
            status, _, body = await _get(f"{base}/api/instances", {"x-api-key": OTHER})
            assert status == 200 and body == {"instances": []}
            statuses = [(await _get(f"{base}/api/instances", {"Authorization": f"Bearer {TOKEN}"}))[0]
                        for _ in range(11)]
            assert statuses[:10] == [200] * 10 and statuses[10] == 429
            status, _, health = await _get(f"{base}/health")
            assert status == 200
            assert health["api"] == {"allowed": 11, "refused": {"unauthorized": 6, "rate_limited": 1}}  # type: ignore[index]
            status, _, text = await _get(f"{base}/metrics", {"Authorization": f"Bearer {SECRET}"})
            assert 'wa_worker_api_refused_total{reason="unauthorized"} 6.0' in str(text)
            assert "wa_worker_api_requests_total 11.0" in str(text)
    finally:
        proc.send_signal(signal.SIGTERM)
        await anyio.to_thread.run_sync(proc.wait, 20)  # the fake proxy (this loop) answers its goodbyes
        await proxy.stop()
    log = log_path.read_text()
    assert TOKEN not in log and OTHER not in log and SECRET not in log
