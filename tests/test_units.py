"""Pure pieces: recipient normalization, backoff, adaptive intervals, settings, secret redaction."""

from __future__ import annotations

import logging
import random

import anyio
import pytest

from wa_worker.config import ConfigError, load_settings
from wa_worker.ids import InvalidRecipient, is_valid_instance_id, normalize_recipient
from wa_worker.logutil import RedactFilter
from wa_worker.timing import AdaptiveInterval, Backoff, backoff_delay, backoff_raw


@pytest.mark.parametrize(("raw", "jid"), [
    ("5511988887777", "5511988887777@s.whatsapp.net"),
    ("+55 (11) 98888-7777", "5511988887777@s.whatsapp.net"),
    ("+1 415-555-0100", "14155550100@s.whatsapp.net"),
    ("5511988887777@s.whatsapp.net", "5511988887777@s.whatsapp.net"),
    ("5511988887777@c.us", "5511988887777@s.whatsapp.net"),
    ("120363012345678901@g.us", "120363012345678901@g.us"),
    ("5511988887777-1600000000", "5511988887777-1600000000@g.us"),
    ("123456789012345@lid", "123456789012345@lid"),
    ("  5511988887777  ", "5511988887777@s.whatsapp.net"),
])
def test_normalize_recipient(raw, jid):
    assert normalize_recipient(raw) == jid


@pytest.mark.parametrize("raw", ["", "12", "abc", "55 11 abc", "x@example.com", "a b@g.us", "abc@s.whatsapp.net",
                                 "1" * 25, None, 5511, "../x@g.us"])
def test_invalid_recipients(raw):
    with pytest.raises(InvalidRecipient):
        normalize_recipient(raw)


@pytest.mark.parametrize(("value", "ok"), [("a", True), ("A1_-z", True), ("a" * 128, True), ("a" * 129, False),
                                           ("-a", False), ("_a", False), ("a/b", False), ("..", False), ("", False),
                                           ("a.b", False), (None, False), (3, False), ("ünï", False)])
def test_instance_id_rule(value, ok):
    assert is_valid_instance_id(value) is ok


def test_backoff_grows_to_cap_with_jitter_and_resets():
    b = Backoff(1.0, 60.0, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(10)]
    for i, d in enumerate(delays):
        raw = min(60.0, 2.0**i)
        assert raw / 2 <= d <= raw
    assert max(delays) <= 60.0 and delays[-1] >= 30.0
    assert len(set(round(d, 6) for d in delays)) == 10  # jittered
    b.reset()
    assert 0.5 <= b.next_delay() <= 1.0


def test_backoff_is_clamped_for_any_number_of_attempts():
    # attempt 1024 is ~13 h of failing reconnects at the 60 s cap: 2.0**1024 overflowed and killed the runner
    for attempt in (6, 30, 1023, 1024, 5000, 10**9):
        b = Backoff(1.0, 60.0, rng=random.Random(attempt), attempt=attempt)
        assert 30.0 <= b.next_delay() <= 60.0
        assert 150.0 <= backoff_delay(attempt + 3, 1.0, 300.0, random.Random(1)) <= 300.0
    # one formula for both forms, exact below the cap
    assert [backoff_raw(i, 1.0, 60.0) for i in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff_raw(3, 0.5, 0.25) == 0.25 and backoff_raw(10**6, 1.0, 60.0, factor=1e6) == 60.0


def test_adaptive_interval_doubles_and_snaps_back():
    a = AdaptiveInterval(2.0, 30.0)
    assert [a.idle() for _ in range(6)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    a.activity()
    assert a.idle() == 2.0
    assert a.busy() == 2.0


def test_settings_defaults_match_the_node_worker(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    s = load_settings(EDGE_BASE_URL="https://x.supabase.co/functions/v1/worker-proxy/", WORKER_SECRET="12345678")
    assert s.edge_base_url == "https://x.supabase.co/functions/v1/worker-proxy"
    assert (s.PORT, str(s.AUTH_DIR), s.INSTANCE_POLL_MS, s.MSG_POLL_MS, s.WA_BACKEND.value, s.LOG_LEVEL.value) == (
        3000, "/data/auth", 10000, 2000, "neonize", "INFO")
    assert "12345678" not in repr(s)


def test_settings_from_dotenv(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for k in ("EDGE_BASE_URL", "WORKER_SECRET", "PORT"):
        monkeypatch.delenv(k, raising=False)
    (tmp_path / ".env").write_text("EDGE_BASE_URL=http://127.0.0.1:9/\nWORKER_SECRET=abcdefgh123\nPORT=4000\n")
    s = load_settings()
    assert s.PORT == 4000 and s.edge_base_url == "http://127.0.0.1:9"


def test_config_error_never_echoes_the_secret(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_settings(EDGE_BASE_URL="not a url", WORKER_SECRET="tiny")
    assert "EDGE_BASE_URL" in str(e.value) and "WORKER_SECRET" in str(e.value)
    assert "tiny" not in str(e.value)


def test_redact_filter_scrubs_messages_and_tracebacks():
    f = RedactFilter(["topsecret-123"])
    rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "header was Bearer %s", ("topsecret-123",), None)
    f.filter(rec)
    assert rec.getMessage() == "header was Bearer ***"
    try:
        raise RuntimeError("boom topsecret-123")
    except RuntimeError:
        import sys

        rec2 = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    f.filter(rec2)
    assert "topsecret-123" not in logging.Formatter().format(rec2)


def test_settings_give_durations_in_seconds():
    s = load_settings(_env_file=None, EDGE_BASE_URL="http://127.0.0.1:9", WORKER_SECRET="x" * 16,
                      INSTANCE_POLL_MS=2500, INSTANCE_POLL_MAX_MS=30_000, MSG_POLL_MS=750, MSG_POLL_MAX_MS=9000,
                      INBOUND_TTL_HOURS=1.5, SIMULATOR_SEND_DELAY_MS=40)
    assert (s.instance_poll_s, s.instance_poll_max_s, s.msg_poll_s, s.msg_poll_max_s) == (2.5, 30.0, 0.75, 9.0)
    assert s.inbound_ttl_s == 5400 and s.simulator_send_delay_s == 0.04


@pytest.mark.anyio
async def test_simulator_session_states_are_the_shared_enum(tmp_path):
    from wa_worker.backends.base import SessionState
    from wa_worker.backends.simulator import SimulatorBackend

    backend = SimulatorBackend(tmp_path / "auth", auto_scan_ms=0, connect_delay_s=0.0)
    events: list[object] = []

    async def sink(event: object) -> None:
        events.append(event)

    async with backend:
        session = await backend.open_session("acme", sink)
        assert session.state is SessionState.IDLE
        await session.connect()
        for _ in range(200):
            if session.state is SessionState.CONNECTED:
                break
            await anyio.sleep(0.01)
        assert session.state is SessionState.CONNECTED and session.describe()["state"] == "connected"
        await session.close()
        assert session.state is SessionState.CLOSED
