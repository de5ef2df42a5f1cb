"""LOG_FORMAT=json (issue #14): one JSON object per line with ts, level, logger, event, instance_id and the
error fields; the secret scrubbed from every field; text stays the default."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from datetime import datetime

import anyio
import pytest

from tests.conftest import make_settings, wait_until
from tests.fakeproxy import SECRET
from tests.proc import ROOT, free_port, start_worker, worker_env
from wa_worker.logutil import make_handler

pytestmark = pytest.mark.anyio


async def test_a_real_worker_logs_one_json_object_per_line(proxy, tmp_path):
    proxy.add_instance("acme")
    proxy.enqueue("acme", f"leak-{SECRET}", "12", "an invalid recipient: a warning naming the message id")
    env = worker_env(tmp_path, proxy.url, LOG_FORMAT="JSON")  # case-insensitive
    log_path = tmp_path / "worker.log"
    proc = start_worker(env, ROOT, log_path)
    try:
        await wait_until(lambda: proxy.status_of("acme") == "CONNECTED", timeout=20, what="connected")
        await wait_until(lambda: proxy.failed_marks, timeout=10, what="the invalid message failed")
        proc.send_signal(signal.SIGTERM)
        await anyio.to_thread.run_sync(proc.wait, 12)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0
    text = log_path.read_text()
    assert SECRET not in text
    records = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    assert len(records) >= 5
    for r in records:
        assert {"ts", "level", "logger", "event"} <= r.keys(), r
        assert datetime.fromisoformat(r["ts"]).tzinfo is not None
        assert r["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    events = [r["event"] for r in records]
    assert any(e.startswith("wa-worker up: backend=simulator") for e in events)
    connected = next(r for r in records if r["event"] == "acme: connected")
    assert connected["instance_id"] == "acme" and connected["logger"] == "wa_worker.instance"
    rejected = next(r for r in records if "rejected" in r["event"] and "leak-" in r["event"])
    assert rejected["level"] == "WARNING" and rejected["instance_id"] == "acme"
    assert "leak-***" in rejected["event"]  # the redaction filter ran on the JSON output
    assert records[-1]["event"] == "wa-worker stopped"


def test_the_text_format_stays_the_default(tmp_path):
    dead_proxy = "http://127.0.0.1:9"  # the worker starts (and logs) without reaching it
    assert make_settings(tmp_path, dead_proxy).LOG_FORMAT.value == "text"
    env = worker_env(tmp_path, dead_proxy, PORT="0")
    r = subprocess.run(["timeout", "-s", "TERM", "3", sys.executable, "-m", "wa_worker"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    lines = r.stderr.splitlines()
    assert any(" INFO wa_worker: wa-worker up" in line for line in lines), r.stderr
    assert not any(line.startswith("{") for line in lines)


def _log_through(handler: logging.Handler, fn) -> list[dict]:
    logger = logging.getLogger("wa_worker.test_json")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        fn(logger)
    finally:
        logger.removeHandler(handler)
    return [json.loads(line) for line in handler.stream.getvalue().splitlines()]  # type: ignore[attr-defined]


def test_error_fields_and_traceback_are_scrubbed_too():
    handler = make_handler("json", [SECRET, "hunter2-pass"], io.StringIO())

    def emit(logger: logging.Logger) -> None:
        try:
            raise ValueError(f"header Authorization: Bearer {SECRET} refused")
        except ValueError:
            logger.exception("call failed for %s", "acme", extra={"instance_id": "acme"})
        try:
            raise KeyError("no secret here")
        except KeyError:
            logger.error("plain failure", exc_info=True)
        logger.info("password hunter2-pass in a URL")

    first, second, third = _log_through(handler, emit)
    assert first["event"] == "call failed for acme" and first["instance_id"] == "acme"
    assert first["error_type"] == "ValueError"
    assert first["error"] == "header Authorization: Bearer *** refused"
    assert "Traceback" in first["traceback"] and SECRET not in json.dumps(first)
    assert second["error_type"] == "KeyError" and "no secret here" in second["error"]
    assert "instance_id" not in second
    assert third["event"] == "password *** in a URL" and "error_type" not in third


def test_text_handler_keeps_one_line_format():
    handler = make_handler("text", [SECRET], io.StringIO())
    logger = logging.getLogger("wa_worker.test_text")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning("secret %s", SECRET)
    finally:
        logger.removeHandler(handler)
    out = handler.stream.getvalue()  # type: ignore[attr-defined]
    assert out.rstrip().endswith("WARNING wa_worker.test_text: secret ***")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_dev_mode_lines_are_json_too(tmp_path):
    """``wa-worker dev`` with LOG_FORMAT=json: its own lines (banner, statuses, the QR hint) and the
    worker's are one format, JSON objects on stderr; nothing else is printed."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORKER_SECRET", "WA_DEV_PROXY_URL")}
    env.update(PYTHONUNBUFFERED="1", LOG_FORMAT="json")
    out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out_path, "w") as out_f, open(err_path, "w") as err_f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "wa_worker", "dev", "--simulator", "--log-level", "INFO",
             "--proxy-port", str(free_port()), "--port", str(free_port())],
            cwd=tmp_path, env=env, stdout=out_f, stderr=err_f, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while "CONNECTING → CONNECTED" not in err_path.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, err_path.read_text()
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(45)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0
    assert out_path.read_text() == ""
    text = err_path.read_text()
    secret = (tmp_path / ".wa-worker" / "secret").read_text().strip()
    assert secret not in text
    records = [json.loads(line) for line in text.splitlines()]
    loggers = {r["logger"] for r in records}
    assert "wa_worker.dev" in loggers and "wa_worker.instance" in loggers  # the dev mode's and the worker's
    events = [(r.get("instance_id"), r["event"]) for r in records]
    assert any(e.startswith("wa-worker dev: reference proxy on http://127.0.0.1:") for _, e in events)
    assert ("default", "status CONNECTING → CONNECTED") in [(i, e.split(" as ")[0]) for i, e in events]
    assert any(i == "default" and e.startswith("new QR code: open http://127.0.0.1:") for i, e in events)
    assert ("default", "default: connected") in events
