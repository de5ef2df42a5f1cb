"""/metrics (issue #14): names and values after real traffic on the simulator, the bearer on the main
port, METRICS_PORT without auth, and the Grafana dashboard / alert rules naming only exported metrics."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import anyio
import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import AUTH, connect, make_settings, running_worker, wait_until
from tests.fakeproxy import SECRET

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def sum_of(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


async def scrape(base: str, headers: dict[str, str] | None = None) -> Samples:
    async with httpx.AsyncClient() as http:
        r = await http.get(base + "/metrics", headers=AUTH if headers is None else headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return parse(r.text)


# long: one scenario of real traffic, then every number it should have moved
async def test_metrics_follow_real_traffic(proxy, tmp_path):
    proxy.add_instance("acme")
    proxy.enqueue("acme", "bad", "12", "x")  # invalid recipient
    proxy.enqueue("acme", "boom", "5511988887777", "will fail")  # the simulator's send fails once
    proxy.enqueue("acme", "ok", "5511988887777", "hello")
    proxy.fail["inbound"] = 2
    proxy.fail["mark-sent"] = 1  # "ok" is offered again: a duplicate suppressed
    async with running_worker(make_settings(tmp_path, proxy.url)) as w:
        base = f"http://127.0.0.1:{w.port}"
        before = await scrape(base)
        assert value(before, "wa_worker_connects_total") == 0
        assert value(before, "wa_worker_messages_sent_total") == 0
        await wait_until(lambda: "acme" in w.backend.sessions)
        w.backend.set_fail_sends("acme", 1)
        await connect(w, proxy)
        await wait_until(lambda: len(proxy.failed_marks) == 2 and "ok" in proxy.sent_marks, what="outcomes")
        await wait_until(lambda: w.outbound.duplicates_suppressed >= 1, what="a duplicate")
        s = w.backend.session("acme")
        await s.receive("5511988887777", "oi")
        await s.receive("5511977776666", "ola")
        await wait_until(lambda: len(proxy.inbound) == 2, timeout=15, what="inbound after failures")
        await s.drop()
        await wait_until(lambda: w.manager.ctx.stats.connects == 2, what="reconnected")

        m = await scrape(base)
        assert value(m, "wa_worker_instances", state="connected") == 1
        assert value(m, "wa_worker_instances", state="reconnecting") == 0
        assert value(m, "wa_worker_connects_total") == 2
        assert value(m, "wa_worker_reconnects_total") == 1
        assert value(m, "wa_worker_disconnects_total", reason="network") == 1
        assert value(m, "wa_worker_qr_codes_total") >= 1
        assert value(m, "wa_worker_messages_sent_total") == 1
        codes = Counter(c for cs in proxy.failed_codes.values() for c in cs)
        assert len(codes) == 2 and sum(codes.values()) == 2
        for code, n in codes.items():
            assert value(m, "wa_worker_messages_failed_total", error_code=code) == n
        assert value(m, "wa_worker_messages_duplicates_suppressed_total") >= 1
        assert value(m, "wa_worker_inbound_received_total") == 2
        assert value(m, "wa_worker_inbound_delivered_total") == 2
        assert value(m, "wa_worker_inbound_dead_lettered_total") == 0
        assert value(m, "wa_worker_journal_backlog", queue="inbound") == 0
        assert value(m, "wa_worker_journal_oldest_pending_age_seconds", queue="inbound") == 0
        # the proxy: calls, failures and the latency histogram, per endpoint
        assert value(m, "wa_worker_proxy_calls_total", endpoint="inbound") == proxy.calls["inbound"] >= 4
        assert value(m, "wa_worker_proxy_failures_total", endpoint="inbound") == 2
        assert value(m, "wa_worker_proxy_failures_total", endpoint="mark-sent") == 1
        assert value(m, "wa_worker_proxy_request_duration_seconds_count", endpoint="inbound") == proxy.calls["inbound"]
        assert value(m, "wa_worker_proxy_request_duration_seconds_bucket", endpoint="inbound", le="+Inf") \
            == proxy.calls["inbound"]
        assert 0 < value(m, "wa_worker_proxy_request_duration_seconds_sum", endpoint="inbound") < 10
        assert 0 <= value(m, "wa_worker_proxy_last_ok_age_seconds") < 5
        # the process, the HTTP server, the loops
        assert value(m, "wa_worker_fds", kind="open") > 5
        assert value(m, "wa_worker_fd_limit") > 0
        assert value(m, "wa_worker_process_resident_memory_bytes") > 10_000_000
        assert value(m, "wa_worker_process_cpu_seconds_total") > 0
        assert value(m, "wa_worker_http_connection_events_total", event="accepted") >= 2
        assert value(m, "wa_worker_ready") == 1
        assert value(m, "wa_worker_loop_failing", loop="discovery") == 0
        assert value(m, "wa_worker_loop_last_ok_age_seconds", loop="discovery") >= 0
        assert value(m, "wa_worker_relay_bytes_total", direction="up") == 0  # the simulator has no relay
        assert value(m, "wa_worker_info", backend="simulator", version=_version(m)) == 1
        # no instance id, phone number or secret in the output
        async with httpx.AsyncClient() as http:
            text = (await http.get(base + "/metrics", headers=AUTH)).text
        assert "acme" not in text and SECRET not in text and "5511988887777" not in text


def _version(m: Samples) -> str:
    return next(dict(ls)["version"] for (n, ls) in m if n == "wa_worker_info")


async def test_metrics_show_a_backlog_then_dead_letters(proxy, tmp_path):
    proxy.add_instance("acme")
    proxy.fail["inbound"] = 1000
    async with running_worker(make_settings(tmp_path, proxy.url), retry_cap_s=0.2) as w:
        base = f"http://127.0.0.1:{w.port}"
        await connect(w, proxy)
        await w.backend.session("acme").receive("5511988887777", "stuck")
        await wait_until(lambda: proxy.calls["inbound"] >= 2, what="inbound retried")
        await anyio.sleep(0.3)
        m = await scrape(base)
        assert value(m, "wa_worker_journal_backlog", queue="inbound") == 1
        assert value(m, "wa_worker_journal_oldest_pending_age_seconds", queue="inbound") >= 0.3
        assert value(m, "wa_worker_proxy_failures_total", endpoint="inbound") >= 2
        # the proxy now rejects it for good: dead-lettered, the backlog empties
        proxy.fail["inbound"] = 0
        proxy.fixed_status["inbound"] = 400
        await wait_until(lambda: w.inbound.dead_lettered == 1, what="dead letter")
        m = await scrape(base)
        assert value(m, "wa_worker_inbound_dead_lettered_total") == 1
        assert value(m, "wa_worker_journal_dead_letters", kind="inbound") == 1
        assert value(m, "wa_worker_journal_backlog", queue="inbound") == 0
        assert value(m, "wa_worker_journal_oldest_pending_age_seconds", queue="inbound") == 0


async def test_metrics_need_the_bearer_on_the_main_port(proxy, tmp_path):
    async with running_worker(make_settings(tmp_path, proxy.url)) as w:
        base = f"http://127.0.0.1:{w.port}"
        async with httpx.AsyncClient() as http:
            assert (await http.get(base + "/metrics")).status_code == 401
            assert (await http.get(base + "/metrics", headers={"Authorization": "Bearer wrong"})).status_code == 401
        assert w.metrics_port is None  # METRICS_PORT unset: no second listener
        assert value(await scrape(base), "wa_worker_instances", state="connected") == 0


async def test_metrics_port_serves_without_auth_on_its_own_address(proxy, tmp_path):
    settings = make_settings(tmp_path, proxy.url, METRICS_PORT=0)
    assert settings.METRICS_HOST == "127.0.0.1"
    proxy.add_instance("acme")
    async with running_worker(settings) as w:
        await connect(w, proxy)
        assert w.metrics_port is not None and w.metrics_port != w.port
        m = await scrape(f"http://127.0.0.1:{w.metrics_port}", headers={})
        assert value(m, "wa_worker_instances", state="connected") == 1
        async with httpx.AsyncClient() as http:
            # only /metrics there; the main port still wants the bearer
            assert (await http.get(f"http://127.0.0.1:{w.metrics_port}/health")).status_code == 404
            assert (await http.get(f"http://127.0.0.1:{w.port}/metrics")).status_code == 401
        port = w.metrics_port
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.ConnectError):  # closed with the worker
            await http.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


# ---------------------------------------------------------------------- deploy/ files

DASHBOARD = ROOT / "deploy" / "grafana" / "wa-worker.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
# PromQL words that are not metric names
_PROMQL_WORDS = {
    "sum", "rate", "irate", "increase", "by", "without", "max", "min", "avg", "count", "histogram_quantile",
    "le", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "absent", "delta", "deriv",
    "max_over_time", "min_over_time", "avg_over_time", "clamp_min", "topk", "bool", "offset", "time",
    "state", "reason", "endpoint", "error_code", "queue", "kind", "loop", "event", "direction", "backend",
    "version", "instance", "job", "inf", "Inf", "vector", "label_replace",
}


async def exported_names(proxy, tmp_path) -> set[str]:
    async with running_worker(make_settings(tmp_path, proxy.url)) as w:
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{w.port}/metrics", headers=AUTH)).text
    names = set()
    for fam in text_string_to_metric_families(text):
        names.update(s.name for s in fam.samples)
        # a labelled family without samples yet (no disconnect so far) is still exported
        names.add(fam.name + "_total" if fam.type == "counter" else fam.name)
    return names


def metric_names_in(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return {w for w in words - _PROMQL_WORDS if not re.fullmatch(r"\d+[smhd]?", w)}


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    return exprs


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {"WaWorkerInstanceDown", "WaWorkerBacklogGrowing", "WaWorkerProxyFailing",
                                           "WaWorkerDescriptorsHigh"}
    return rules


async def test_dashboard_and_alerts_name_only_exported_metrics(proxy, tmp_path):
    exported = await exported_names(proxy, tmp_path)
    exprs = dashboard_exprs() + [r["expr"] for r in alert_rules()]
    for expr in exprs:
        names = metric_names_in(expr)
        assert names, expr
        assert names <= exported, f"{expr!r} names {sorted(names - exported)}, not exported"
    for r in alert_rules():
        assert r["labels"]["severity"] in ("warning", "critical") and r["annotations"]["summary"]


def test_alert_rules_pass_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        reason = "promtool not installed (Debian: apt-get install prometheus); the YAML is checked above"
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(f"{reason} (CI=true: scripts/test.sh installs it)", pytrace=False)
        pytest.skip(reason)
    r = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


async def test_docs_table_lists_exactly_the_exported_metrics(proxy, tmp_path):
    exported = await exported_names(proxy, tmp_path)
    families = {re.sub(r"_(bucket|count|sum|created)$", "", n) for n in exported}
    table = (ROOT / "docs" / "metrics.md").read_text().split("### The metrics", 1)[1].split("###", 1)[0]
    documented = set(re.findall(r"`(wa_worker_[a-z_]+)`", table))
    assert documented <= families, sorted(documented - families)
    assert families <= documented, f"undocumented: {sorted(families - documented)}"


@pytest.mark.neonize
async def test_relay_bytes_of_the_neonize_backend(proxy, tmp_path):
    """Bytes through the real CONNECT relay of a running neonize worker reach /metrics
    (a ticket issued as a session's attempt would, to a loopback echo server)."""

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(1024):
            w.write(data)
            await w.drain()
        w.close()

    echo_srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    echo_port = echo_srv.sockets[0].getsockname()[1]
    try:
        async with running_worker(make_settings(tmp_path, proxy.url, WA_BACKEND="neonize")) as w:
            relay = w.backend.relay
            assert relay is not None
            relay.allowed_ports = None  # the echo server is not on 443
            ticket = relay.issue("acme")
            token = base64.b64encode(f"{ticket.token}:x".encode()).decode()
            r, wr = await asyncio.open_connection("127.0.0.1", relay.port)
            wr.write(f"CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\nHost: x\r\n"
                     f"Proxy-Authorization: Basic {token}\r\n\r\n".encode())
            assert (await r.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            wr.write(b"hello relay")
            assert await r.readexactly(11) == b"hello relay"
            relay.revoke(ticket)  # counted still: the totals outlive the ticket
            wr.close()
            m = await scrape(f"http://127.0.0.1:{w.port}")
            assert value(m, "wa_worker_relay_bytes_total", direction="up") == 11
            assert value(m, "wa_worker_relay_bytes_total", direction="down") == 11
            assert value(m, "wa_worker_info", backend="neonize", version=_version(m)) == 1
    finally:
        echo_srv.close()
