"""``wa-worker doctor``: check a configuration before deploy; one line per check.

It reads the same settings as the daemon (same messages), proves ``AUTH_DIR``
and ``STATE_DB`` writable as the daemon's start does (creating the folders),
connects to ``DATABASE_URL`` when set (creating ``wa_worker_sessions``),
reports the descriptor limit, then asks the proxy, through the worker's own
edge client, only what changes nothing there:

* ``GET /wa-worker-doctor-no-such-path-…``: reachability, the ``Date`` header
  (clock skew), and how this proxy answers a path it does not have — the
  yardstick that tells "wrong path" from "unknown instance" in later 404s;
* ``GET /disconnected-instances`` (a read): the secret and the base path;
* ``GET /queued-messages?instanceId=<an id no instance has>``: a claiming proxy
  has nothing of that instance to claim;
* ``POST /mark-sent`` and ``POST /mark-failed`` for a message id nobody has (a random UUID):
  the contract asks a 2xx that changes nothing (and a 404 from ``/mark-failed``
  means "not supported");
* ``GET /instance-settings`` (a read, optional);
* ``GET /events?wait=1`` (the push channel, optional; a read, no ``X-Worker-Id``);
* ``GET`` on ``/update-status``, ``/inbound`` and ``/upload-media``: a POST
  there could create a record on a proxy that does not check its input, so
  only the path is asked for (a 405 "method not allowed" means it exists);
* batch ``GET /queued-messages`` (no ``instanceId``) only with
  ``--probe-batch``: a claiming proxy (the Supabase kit) would hold every
  queued message for its lease (5 minutes) before offering it again.

Exit status: 1 when a line is ✗, else 0 (``!`` lines are warnings).
"""

from __future__ import annotations

import argparse
import email.utils
import logging
import resource
import secrets
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from .config import ConfigError, Settings, load_settings, placeholder_warnings
from .edge.client import NOT_FOUND_HINT, SECRET_HINT, EdgeClient, EdgeError, EndpointMissing, InstanceGone, Unauthorized
from .edge.transport import Reply, Transport
from .logutil import redact_url
from .preflight import StartupError, check_auth_dir, check_session_store, check_state_db
from .storage.db import StoreOpenError
from .storage.pgjournal import SCHEMA, PgJournal

OK, WARN, FAIL, SKIP = "✓", "!", "✗", "·"
CLOCK_SKEW_WARN_S = 30.0
FD_LIMIT_WARN = 4096
_BODY_COMPARED = 300  # what EdgeError keeps of a body


@dataclass(frozen=True)
class Check:
    mark: str  # OK, WARN, FAIL or SKIP
    name: str
    detail: str


def render(checks: list[Check]) -> str:
    width = max((len(c.name) for c in checks), default=0)
    return "\n".join(f"{c.mark} {c.name:<{width}}  {c.detail}" for c in checks)


def local_checks(settings: Settings) -> list[Check]:
    out = []
    for name, check, path in (("AUTH_DIR", check_auth_dir, settings.AUTH_DIR),
                              ("STATE_DB", check_state_db, settings.STATE_DB)):
        try:
            check(path)
            out.append(Check(OK, name, f"{path} writable"))
        except StartupError as exc:
            out.append(Check(FAIL, name, str(exc)))
    if settings.database_url and settings.WA_BACKEND.value == "neonize":
        try:
            check_session_store(settings.database_url, settings.DATABASE_IDLE_TIMEOUT_S)
            out.append(Check(OK, "DATABASE_URL", f"{redact_url(settings.database_url)}: reachable, "
                                                 "wa_worker_sessions ready"))
        except StartupError as exc:
            out.append(Check(FAIL, "DATABASE_URL", str(exc).removeprefix("DATABASE_URL: ")))
    if settings.database_url and settings.JOURNAL_IN_DATABASE:
        out.append(_journal_check(settings.database_url))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    usable = soft if hard == resource.RLIM_INFINITY else hard  # the daemon raises soft to hard at start
    if usable == resource.RLIM_INFINITY or usable >= FD_LIMIT_WARN:
        out.append(Check(OK, "descriptor limit", f"soft {soft}, hard {hard}"))
    else:
        out.append(Check(WARN, "descriptor limit", f"hard limit {usable} < {FD_LIMIT_WARN}: each instance holds "
                                                   "sockets and files; raise nofile (ulimit -n, --ulimit)"))
    return out


def _journal_check(url: str) -> Check:
    """The journal's schema in DATABASE_URL, created or migrated as the daemon's start does."""
    try:
        journal = PgJournal(url, worker_id="doctor")
    except StoreOpenError as exc:
        return Check(FAIL, "journal", f"in DATABASE_URL ({exc.path}): {exc.cause}")
    journal.close()
    return Check(OK, "journal", f"in DATABASE_URL ({journal.display}): schema {SCHEMA} at version "
                                f"{journal.schema_version}")


class _Yardstick:
    """How the proxy answers a path it does not have."""

    def __init__(self, reply: Reply, path: str) -> None:
        self.status = reply.status
        self.body = self._norm(reply.body.decode("utf-8", "replace"), path)

    @staticmethod
    def _norm(body: str, path: str) -> str:
        return body[:_BODY_COMPARED].replace(path.lstrip("/"), "{path}")

    def missing(self, status: int | None, body: str | None, path: str) -> bool:
        """A 404 like the one for a nonexistent path (any 404 if that one was not a 404)."""
        if status != 404:
            return False
        return self.status != 404 or self._norm(body or "", path) == self.body


# long: the probes in order, each with its verdict; splitting them would scatter the shared yardstick
async def proxy_checks(settings: Settings, *, probe_batch: bool = False, transport: Transport | None = None,
                       now: Callable[[], float] = time.time) -> list[Check]:
    client = EdgeClient(settings.edge_base_url, settings.WORKER_SECRET.get_secret_value(),
                        timeout_s=settings.EDGE_TIMEOUT_S, max_response_bytes=settings.EDGE_MAX_RESPONSE_BYTES,
                        transport=transport, max_connections=4)
    token = secrets.token_hex(6)
    probe_id = f"wa-worker-doctor-{token}"  # an instance id no proxy has
    message_id = str(uuid.uuid4())  # a message id no proxy has (a UUID: the Supabase kit's ids are)
    out: list[Check] = []
    try:
        nowhere = f"/wa-worker-doctor-no-such-path-{token}"
        started = now()
        t0 = time.monotonic()
        try:
            reply = await client.probe("GET", nowhere)
        except EdgeError as exc:
            out.append(Check(FAIL, "proxy reachable", f"{redact_url(settings.edge_base_url)}: "
                                                      f"{str(exc).split(': ', 1)[-1]}"))
            return out
        elapsed = time.monotonic() - t0
        out.append(Check(OK, "proxy reachable", f"{redact_url(settings.edge_base_url)} answered in "
                                                f"{elapsed * 1000:.0f} ms"))
        out.append(_clock(reply, started + elapsed / 2))
        yard = _Yardstick(reply, nowhere)

        try:
            found = await client.disconnected_instances()
        except Unauthorized as exc:
            out.append(Check(FAIL, "secret", f"{SECRET_HINT} (HTTP {exc.status}): set the same value on both sides"))
            return out
        except EdgeError as exc:
            out.append(Check(OK, "secret", "not refused"))
            mark_detail = NOT_FOUND_HINT if exc.status == 404 else str(exc)
            out.append(Check(FAIL, "GET /disconnected-instances", mark_detail))
        else:
            out.append(Check(OK, "secret", "accepted"))
            out.append(Check(OK, "GET /disconnected-instances", f"answers ({len(found)} instance(s) to connect)"))

        try:
            await client.queued_messages(probe_id)
            out.append(Check(OK, "GET /queued-messages", "answers (per instance)"))
        except EdgeError as exc:
            out.append(_verdict("GET /queued-messages", exc, yard, "/queued-messages",
                                ok_gone="answers (404 for an unknown instance)"))

        try:
            await client.mark_sent(message_id, "WADOCTORPROBE")
            out.append(Check(OK, "POST /mark-sent", "answers (2xx for an unknown message id)"))
        except EdgeError as exc:
            out.append(_verdict("POST /mark-sent", exc, yard, "/mark-sent"))

        for path in ("/update-status", "/inbound"):
            out.append(await _path_check(client, path, yard, required=True))

        try:
            supported = await client.mark_failed(message_id, "wa-worker doctor probe (no such message)")
            out.append(Check(OK, "POST /mark-failed", "supported") if supported else
                       Check(WARN, "POST /mark-failed", "not supported (404): failed messages are not reported"))
        except EndpointMissing as exc:
            out.append(Check(WARN, "POST /mark-failed", f"not supported (HTTP {exc.status}): failed messages "
                                                        "are not reported"))
        except EdgeError as exc:
            out.append(_verdict("POST /mark-failed", exc, yard, "/mark-failed"))

        out.append(await _path_check(client, "/upload-media", yard, required=False))

        try:
            items, _cursor = await client.instance_settings(None)
            out.append(Check(OK, "GET /instance-settings", f"supported ({len(items)} instance(s) with settings "
                                                           "or a proxy_url)"))
        except EndpointMissing as exc:
            out.append(Check(WARN, "GET /instance-settings", f"not supported (HTTP {exc.status}): settings and "
                                                             "proxy_url reach an instance only in discovery items"))
        except EdgeError as exc:
            out.append(_verdict("GET /instance-settings", exc, yard, "/instance-settings"))

        try:
            await client.events(wait_s=1.0, cursor=None, worker_id=None)
            out.append(Check(OK, "GET /events", "supported: queued messages are pushed (no /wake needed)"))
        except EndpointMissing as exc:
            out.append(Check(WARN, "GET /events", f"not supported (HTTP {exc.status}): idle instances wait for "
                                                  "their next poll (up to MSG_POLL_MAX_MS) unless /wake is called"))
        except EdgeError as exc:
            out.append(_verdict("GET /events", exc, yard, "/events"))

        if not probe_batch:
            out.append(Check(SKIP, "batch /queued-messages", "not probed (a claiming proxy would hold every queued "
                                                             "message for its lease); --probe-batch to check"))
        else:
            try:
                await client.queued_messages_batch()
                out.append(Check(OK, "batch /queued-messages", "supported: one call polls every instance"))
            except EndpointMissing:
                out.append(Check(OK, "batch /queued-messages", "not supported: one call per connected instance"))
            except EdgeError as exc:
                out.append(_verdict("batch /queued-messages", exc, yard, "/queued-messages"))
        return out
    finally:
        await client.aclose()


def _clock(reply: Reply, local: float) -> Check:
    header = reply.headers.get("date") or reply.headers.get("Date")
    when = None
    if header:
        try:
            when = email.utils.parsedate_to_datetime(header)
        except (TypeError, ValueError, IndexError, OverflowError):
            when = None
    if when is None:
        return Check(WARN, "clock skew", "the proxy sends no readable Date header: not measured")
    skew = when.timestamp() - local
    # Date has a resolution of one second
    if abs(skew) <= CLOCK_SKEW_WARN_S:
        return Check(OK, "clock skew", f"{abs(skew):.0f} s against the proxy's Date")
    return Check(WARN, "clock skew", f"{skew:+.0f} s against the proxy: fix NTP on one side (WhatsApp and "
                                     "message timestamps need a correct clock)")


def _verdict(name: str, exc: EdgeError, yard: _Yardstick, path: str, *, ok_gone: str = "") -> Check:
    if isinstance(exc, Unauthorized):
        return Check(FAIL, name, f"{SECRET_HINT} (HTTP {exc.status})")
    if yard.missing(exc.status, exc.body, path):
        return Check(FAIL, name, NOT_FOUND_HINT)
    if ok_gone and isinstance(exc, InstanceGone):
        return Check(OK, name, ok_gone)
    return Check(FAIL, name, str(exc).split(": ", 1)[-1])


async def _path_check(client: EdgeClient, path: str, yard: _Yardstick, *, required: bool) -> Check:
    name = f"POST {path}"
    try:
        reply = await client.probe("GET", path)
    except EdgeError as exc:
        return Check(FAIL, name, str(exc).split(": ", 1)[-1])
    if reply.status in (401, 403):
        return Check(FAIL, name, f"{SECRET_HINT} (HTTP {reply.status})")
    if yard.missing(reply.status, reply.body.decode("utf-8", "replace"), path):
        if required:
            return Check(FAIL, name, NOT_FOUND_HINT)
        return Check(WARN, name, "not supported (404): received media reaches /inbound without its bytes")
    return Check(OK, name, f"present (HTTP {reply.status} to a GET, which changes nothing)")


def run(settings_overrides: dict[str, object] | None = None, *, probe_batch: bool = False) -> tuple[list[Check], int]:
    """Every check, and the exit status (1 when one failed)."""
    try:
        settings = load_settings(**(settings_overrides or {}))
    except ConfigError as exc:
        checks = [Check(FAIL, "configuration", str(exc)),
                  Check(SKIP, "the rest", "not checked: fix the configuration first")]
        return checks, 1
    checks = [Check(OK, "configuration", f"every variable valid (WA_BACKEND={settings.WA_BACKEND.value})")]
    checks += [Check(WARN, "configuration", w) for w in placeholder_warnings(settings)]
    checks += local_checks(settings)
    checks += anyio.run(lambda: proxy_checks(settings, probe_batch=probe_batch))
    return checks, 1 if any(c.mark == FAIL for c in checks) else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="wa-worker doctor",
        description="Check the configuration (environment and ./.env), AUTH_DIR/STATE_DB and the edge proxy. "
                    "Prints one line per check (✓ ok, ! warning, ✗ problem) and exits 1 on a problem.")
    parser.add_argument("--probe-batch", action="store_true",
                        help="also probe batch GET /queued-messages (a claiming proxy holds the queued "
                             "messages it returns for its lease)")
    args = parser.parse_args(argv)
    logging.getLogger("wa_worker.edge").disabled = True  # the table says it once, without log noise
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    checks, status = run(probe_batch=args.probe_batch)
    print(render(checks))
    print("problems found" if status else "ready to deploy")
    return status
