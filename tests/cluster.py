"""A fleet on one machine, for the cluster test and ``scripts/bench_fleet.py`` (issue #13).

Real processes: the reference proxy (``wa-worker dev proxy``, SQLite), N ``wa-worker``
processes on the simulator with their simulated sessions in one PostgreSQL database
(``DATABASE_URL``: an instance paired on one worker resumes on any other) and each its
own ``STATE_DB`` and ``AUTH_DIR`` (a pod's volume: a killed worker restarted with them
delivers what it journaled).

Between the workers and the proxy sits :class:`Recorder`, a pass-through HTTP proxy in
this process that writes down every call (start/end time, endpoint, ``X-Worker-Id``,
instance, ``lease_token``, status, and the leases each ``POST /leases`` answer granted),
so a test can count 409s and check that no write under a superseded lease was accepted.

What a worker did to WhatsApp is read from its simulator's files: ``simulator-sent.jsonl``
(every delivered message) and ``simulator-sessions.jsonl`` (each session's time online,
"up" written before it can send, "down" after it no longer can).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from tests.fakeproxy import SECRET
from tests.proc import free_port, start_worker, worker_env

T = TypeVar("T")

FENCED_WRITES = ("/update-status", "/queued-messages", "/mark-sent", "/mark-failed")
HOP_HEADERS = ("Authorization", "X-Worker-Id", "Content-Type")


@dataclass(slots=True)
class Call:
    """One proxy call as the recorder saw it (times: ``time.time()``)."""

    t0: float
    t1: float
    method: str
    path: str
    worker: str | None
    instance: str | None
    token: int | None
    message: str | None
    status: int
    granted: list[tuple[str, int]] = field(default_factory=list)  # /leases: what the worker holds after it
    claimed: list[tuple[str, str, int | None]] = field(default_factory=list)  # claims: (message, instance, token)


def _int(v: Any) -> int | None:
    try:
        return int(v) if v is not None and not isinstance(v, bool) else None
    except (TypeError, ValueError):
        return None


class Recorder:
    """A pass-through proxy in front of ``upstream`` that records every call (:class:`Call`)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.calls: list[Call] = []
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> str:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        if self._session is not None:  # first: the long polls in flight end with it
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        t0 = time.time()
        body = await request.read()
        worker = request.headers.get("X-Worker-Id")
        headers = {k: request.headers[k] for k in HOP_HEADERS if k in request.headers}
        try:
            async with self._session.request(request.method, self.upstream + request.path_qs, data=body or None,
                                             headers=headers) as resp:
                payload = await resp.read()
                status, ctype = resp.status, resp.headers.get("Content-Type", "application/json")
        except (aiohttp.ClientError, RuntimeError):  # the proxy went away, or we are closing
            return web.json_response({"error": "upstream unavailable"}, status=502)
        self._record(t0, request, body, worker, status, payload)
        return web.Response(body=payload, status=status, headers={"Content-Type": ctype})

    def _record(self, t0: float, request: web.Request, body: bytes, worker: str | None, status: int,
                payload: bytes) -> None:
        data: dict[str, Any] = {}
        if body:
            try:
                data = json.loads(body)
            except ValueError:
                data = {}
        if not isinstance(data, dict):
            data = {}
        q = request.query
        call = Call(t0, time.time(), request.method, request.path, worker,
                    data.get("instanceId") or q.get("instanceId"), _int(data.get("lease_token", q.get("lease_token"))),
                    data.get("messageId"), status)
        if status == 200 and request.path in ("/leases", "/queued-messages"):
            try:
                answer = json.loads(payload)
            except ValueError:
                answer = {}
            if request.path == "/leases":
                call.granted = [(str(x["instanceId"]), int(x["token"])) for x in answer.get("leases", [])]
            else:
                call.claimed = [(str(m["id"]), str(m.get("instanceId") or call.instance),
                                 _int(m.get("lease_token", call.token))) for m in answer.get("messages", [])]
        self.calls.append(call)


class Loop:
    """An asyncio loop in a thread (the recorder, the traffic): ``run(coro)`` from the test's thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="cluster-loop")
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class WorkerProc:
    name: str
    port: int
    home: Path
    proc: subprocess.Popen[bytes] | None = None
    ended_at: float | None = None  # when it was killed or seen exited
    ends: dict[int, float] = field(default_factory=dict)  # pid → when that process was killed or seen exited

    def end_of(self, pid: int) -> float:
        """When process ``pid`` of this worker ended (now if it still runs)."""
        return self.ends.get(pid, time.time())


def http_json(method: str, url: str, body: Any = None, timeout: float = 5.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


class DevProxyTarget:
    """The reference proxy, ``wa-worker dev proxy`` (SQLite), as a subprocess."""

    name = "dev"

    def __init__(self, root: Path, ttl_s: float) -> None:
        self.root = root
        self.ttl_s = ttl_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.root / "proxy.log", "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_", "WORKER_", "WA_"))}
        # a claim a worker dropped (a runner stopped by fencing or a lost lease, same token) comes back
        # within the test's settle window instead of the production 5 minutes
        env["WA_DEV_CLAIM_LEASE_S"] = "20"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wa_worker", "dev", "proxy", "--dir", str(self.root / "proxy"),
             "--proxy-port", str(self.port), "--no-instance", "--secret", SECRET, "--lease-ttl", f"{self.ttl_s:g}"],
            env=env, cwd=self.root, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        Fleet.wait(self._up, 30, "the dev proxy")

    def _up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"dev proxy exited {self.proc.returncode}")
        try:
            http_json("GET", self.url + "/dev/instances", timeout=1)
            return True
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def add_instance(self, iid: str) -> None:
        http_json("POST", self.url + "/dev/instances", {"id": iid})

    def instances(self) -> list[dict[str, Any]]:
        """``{id, status, holder}`` of every instance (holder None: free or revoked)."""
        out = []
        for i in http_json("GET", self.url + "/dev/instances")["instances"]:
            lease = i.get("lease")
            out.append({"id": i["id"], "status": i["status"],
                        "holder": lease["holder"] if lease and not lease["revoked"] else None})
        return out

    def queue(self, iid: str, to: str, body: str) -> str | None:
        """Queue a message as the SaaS would (the dev API); its id."""
        return str(http_json("POST", self.url + "/dev/messages", {"instanceId": iid, "to": to, "body": body},
                             timeout=3)["message"]["id"])

    def _rows(self, table: str) -> list[dict[str, Any]]:
        db = sqlite3.connect(f"file:{self.root / 'proxy' / 'proxy.db'}?mode=ro", uri=True, timeout=10)
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute(f"SELECT * FROM {table}")]
        finally:
            db.close()

    def outbound(self) -> list[dict[str, Any]]:
        """``{body, status, error_code}`` of every queued message."""
        return [{"body": r["body"], "status": r["status"], "error_code": r["error_code"]} for r in self._rows("outbound")]

    def inbound_bodies(self) -> list[str]:
        return [str(r["body"]) for r in self._rows("inbound")]


class KitTarget:
    """The Supabase kit: ``supabase/functions/worker-proxy`` under Deno on its own database of the
    PostgreSQL server (migrations applied), lease TTL ``ttl_s``."""

    name = "kit"

    def __init__(self, root: Path, ttl_s: float, server: Any) -> None:
        from tests.pg_helpers import EdgeFunction, WaDb  # here: only this target needs Deno and the kit

        self.root = root
        self.db = WaDb(server, "cluster_kit")
        server.create_database(self.db.dbname)
        self.db.apply_migrations()
        self.fn = EdgeFunction(self.db.dsn, SECRET, extra_env={"WORKER_LEASE_TTL_SECONDS": f"{max(1, round(ttl_s))}",
                                                                        "CLAIM_LEASE_SECONDS": "20"})
        self.url = ""
        self._conn: Any = None
        self._lock = threading.Lock()

    def start(self) -> None:
        import psycopg  # here: only this target reads the kit's tables

        self.fn.start()
        self.url = self.fn.base_url
        self._conn = psycopg.connect(self.db.dsn, autocommit=True)

    def stop(self) -> None:
        self.fn.stop()
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _q(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        import psycopg  # here: only this target reads the kit's tables

        try:
            with self._lock:
                if self._conn is None:  # stopped: the checks read the tables with a connection of their own
                    with psycopg.connect(self.db.dsn, autocommit=True) as conn, conn.cursor() as cur:
                        cur.execute(sql, args)
                        return list(cur.fetchall()) if cur.description else []
                with self._conn.cursor() as cur:
                    cur.execute(sql, args)
                    return list(cur.fetchall()) if cur.description else []
        except psycopg.Error as exc:
            raise OSError(f"kit database: {exc}") from exc

    def add_instance(self, iid: str) -> None:
        self._q("insert into public.wa_instances (id) values (%s)", iid)

    def instances(self) -> list[dict[str, Any]]:
        rows = self._q("select id, status, lease_worker, lease_released or lease_revoked from public.wa_instances "
                       "order by id")
        return [{"id": r[0], "status": r[1], "holder": None if r[3] else r[2]} for r in rows]

    def queue(self, iid: str, to: str, body: str) -> str | None:
        rows = self._q('insert into public.wa_outbound (instance_id, "to", body) values (%s, %s, %s) returning id',
                       iid, to, body)
        return str(rows[0][0])

    def outbound(self) -> list[dict[str, Any]]:
        rows = self._q("select body, status, error_code from public.wa_outbound")
        return [{"body": r[0], "status": r[1], "error_code": r[2]} for r in rows]

    def inbound_bodies(self) -> list[str]:
        return [str(r[0]) for r in self._q("select body from public.wa_inbound")]


class Fleet:
    """The reference proxy, the recorder and the workers of one run under ``root``."""

    def __init__(self, root: Path, database_url: str, *, ttl_s: float = 6.0, target: Any = None,
                 worker_env_extra: dict[str, str] | None = None) -> None:
        self.root = root
        self.database_url = database_url
        self.ttl_s = ttl_s
        self.extra = worker_env_extra or {}
        self.loop = Loop()
        self.target = target if target is not None else DevProxyTarget(root, ttl_s)
        self.recorder = Recorder("")
        self.workers: dict[str, WorkerProc] = {}
        self.events: list[tuple[float, str, str]] = []  # (time, what, worker): signals sent by the test

    # ------------------------------------------------------------------ processes

    def start_proxy(self) -> None:
        self.target.start()
        self.recorder.upstream = self.target.url
        self.loop.run(self.recorder.start())

    def add_instances(self, n: int, prefix: str = "i") -> list[str]:
        ids = [f"{prefix}{k:03d}" for k in range(n)]
        for iid in ids:
            self.target.add_instance(iid)
        return ids

    def start_worker(self, name: str, **extra: str) -> WorkerProc:
        w = self.workers.get(name)
        if w is None:
            w = WorkerProc(name, free_port(), self.root / name)
            w.home.mkdir(parents=True, exist_ok=True)
            self.workers[name] = w
        env = worker_env(w.home, self.recorder.url, WORKER_ID=name, PORT=str(w.port), DATABASE_URL=self.database_url,
                         MSG_POLL_MS="1000", MSG_POLL_MAX_MS="30000", EDGE_TIMEOUT_S="5",
                         **{"LOG_LEVEL": "INFO", **self.extra, **extra})
        w.proc = start_worker(env, w.home, w.home / "worker.log")
        w.ended_at = None
        self.events.append((time.time(), "start", name))
        return w

    def signal(self, name: str, sig: signal.Signals) -> float:
        w = self.workers[name]
        assert w.proc is not None
        t = time.time()
        w.proc.send_signal(sig)
        self.events.append((t, sig.name, name))
        if sig == signal.SIGKILL:
            w.proc.wait(10)
            w.ended_at = w.ends[w.proc.pid] = t
        return t

    def wait_exit(self, name: str, timeout: float = 60) -> int:
        w = self.workers[name]
        assert w.proc is not None
        rc = w.proc.wait(timeout)
        w.ended_at = w.ends[w.proc.pid] = time.time()
        return rc

    def stop_all(self) -> None:
        """SIGTERM every worker (graceful), then the recorder (its long polls to the proxy go with
        it), then the proxy."""
        for w in self.workers.values():
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGCONT)
                w.proc.terminate()
        for w in self.workers.values():
            if w.proc is not None:
                try:
                    w.proc.wait(30)
                except subprocess.TimeoutExpired:
                    w.proc.kill()
                    w.proc.wait(5)
                if w.ended_at is None:
                    w.ended_at = w.ends[w.proc.pid] = time.time()
        try:
            self.loop.run(self.recorder.close(), timeout=10)
        finally:
            self.loop.close()
        self.target.stop()
        with open(self.root / "calls.jsonl", "w") as f:  # for a post-mortem
            for c in self.recorder.calls:
                f.write(json.dumps({k: getattr(c, k) for k in Call.__slots__}) + "\n")

    def proc_stats(self, name: str) -> tuple[float, int]:
        """(CPU seconds, RSS bytes) of worker ``name``'s process, from /proc."""
        w = self.workers[name]
        assert w.proc is not None
        fields = Path(f"/proc/{w.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        return cpu, rss

    def tail(self, rel: str, n: int = 3000) -> str:
        try:
            return (self.root / rel).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def live(self) -> dict[str, WorkerProc]:
        return {n: w for n, w in self.workers.items() if w.proc is not None and w.proc.poll() is None}

    # ------------------------------------------------------------------ reading state

    @staticmethod
    def wait(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = cond()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(every)

    def holders(self) -> dict[str, str | None]:
        """instance → the worker holding its lease (None: free or revoked)."""
        return {i["id"]: i["holder"] for i in self.target.instances()}

    def all_connected(self, names: set[str] | None = None) -> bool:
        """Every instance CONNECTED at the proxy, held by a live worker (one of ``names``) whose
        simulator has it online."""
        live = set(self.live()) if names is None else names
        insts = self.target.instances()
        if not all(i["status"] == "CONNECTED" and i["holder"] in live for i in insts):
            return False
        online: dict[str, set[str]] = {}
        for n in live:
            online[n] = self.sim_online(n)
        return all(i["id"] in online[i["holder"]] for i in insts)

    def sim_online(self, name: str) -> set[str]:
        w = self.workers[name]
        try:
            items = http_json("GET", f"http://127.0.0.1:{w.port}/simulator/instances", timeout=3)
        except (OSError, urllib.error.URLError, ValueError):
            return set()
        rows = items.get("instances", items) if isinstance(items, dict) else items
        return {r["id"] for r in rows if r.get("state") == "connected"}

    def session_log(self) -> dict[str, list[tuple[float, float, str]]]:
        """instance → every time online (start, end, worker), from the simulators' records. A session
        still "up" when its process ended ends then (kill -9: the process and its socket are gone)."""
        out: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
        for name, w in self.workers.items():
            auth = w.home / "auth"
            if not auth.is_dir():
                continue
            for path in auth.glob("*/simulator-sessions.jsonl"):
                iid = path.parent.name
                up: dict[int, float] = {}  # pid → its open "up"
                for line in path.read_text().splitlines():
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    pid, ts = int(rec["pid"]), float(rec["ts"])
                    if rec["event"] == "up":
                        up[pid] = ts
                    elif rec["event"] == "down" and pid in up:
                        out[iid].append((up.pop(pid), ts, name))
                for pid, ts in up.items():  # never went down: online until its process ended
                    out[iid].append((ts, w.end_of(pid), name))
        return out

    def sent_log(self) -> list[dict[str, Any]]:
        """Every message any worker's simulator delivered, with ``worker`` and ``instance``."""
        out = []
        for name, w in self.workers.items():
            for path in (w.home / "auth").glob("*/simulator-sent.jsonl"):
                for line in path.read_text().splitlines():
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    out.append({**rec, "worker": name, "instance": path.parent.name})
        return out


def overlaps(log: dict[str, list[tuple[float, float, str]]], tolerance_s: float = 0.0
             ) -> list[tuple[str, tuple[float, float, str], tuple[float, float, str]]]:
    """Pairs of times online of one instance on two different workers that overlap by more than
    ``tolerance_s``."""
    found = []
    for iid, spans in log.items():
        spans = sorted(spans)
        for k, a in enumerate(spans):
            for b in spans[k + 1:]:
                if b[0] >= a[1]:
                    break
                if a[2] != b[2] and min(a[1], b[1]) - b[0] > tolerance_s:
                    found.append((iid, a, b))
    return found


def superseded_writes(calls: list[Call]) -> list[Call]:
    """Fenced writes sent under a lease token that was superseded when they were sent, whatever
    the answer: an ``/update-status`` or claim whose instance had been granted a higher token
    (from the end of the ``POST /leases`` answer that granted it), a ``/mark-sent`` or
    ``/mark-failed`` under a token its message was never claimed under (the contract's exception)."""
    grants: dict[str, list[tuple[float, int]]] = defaultdict(list)  # instance -> (answer end, token)
    claim_tokens: dict[str, set[int | None]] = defaultdict(set)
    for c in calls:
        for iid, tok in c.granted:
            grants[iid].append((c.t1, tok))
        for mid, _iid, tok in c.claimed:
            claim_tokens[mid].add(tok)

    def superseded(iid: str, tok: int, at: float) -> bool:
        return any(t1 < at and g > tok for t1, g in grants.get(iid, ()))

    out = []
    for c in calls:
        if c.path not in FENCED_WRITES or c.token is None or c.status >= 500:
            continue
        if c.path in ("/mark-sent", "/mark-failed"):
            if c.token not in claim_tokens.get(c.message or "", set()):
                out.append(c)
        elif c.instance is not None and superseded(c.instance, c.token, c.t0):
            out.append(c)
    return out


def stale_writes(calls: list[Call]) -> list[Call]:
    """The superseded writes (:func:`superseded_writes`) the proxy accepted (2xx)."""
    return [c for c in superseded_writes(calls) if 200 <= c.status < 300]


class Traffic:
    """Steady traffic while it runs: messages queued through the proxy's dev API (round robin over
    the instances) and inbound messages injected into the simulator of the worker the proxy's lease
    table names as the instance's holder. ``queued``: body → (instance, time, message id);
    ``injected``: body → (instance, worker, time) for each injection the worker accepted (journaled)."""

    def __init__(self, fleet: Fleet, instances: list[str], *, out_per_s: float = 10.0, in_per_s: float = 5.0) -> None:
        self.fleet = fleet
        self.instances = instances
        self.out_gap = 1.0 / out_per_s if out_per_s > 0 else None
        self.in_gap = 1.0 / in_per_s if in_per_s > 0 else None
        self.queued: dict[str, tuple[str, float, str]] = {}
        self.injected: dict[str, tuple[str, str, float]] = {}
        self.refused: list[tuple[str, str, str]] = []  # (instance, worker, why): injections not accepted
        self._holders: dict[str, str | None] = {}
        self._stop = asyncio.Event()
        self._task: asyncio.Future[None] | None = None

    def start(self) -> None:
        async def go() -> None:
            self._stop = asyncio.Event()
            self._task = asyncio.ensure_future(self._run())
        self.fleet.loop.run(go())

    def stop(self) -> None:
        async def halt() -> None:
            self._stop.set()
            if self._task is not None:
                await self._task
        self.fleet.loop.run(halt(), timeout=60)

    async def _run(self) -> None:
        auth = {"Authorization": f"Bearer {SECRET}"}  # the simulator routes of the workers
        async with aiohttp.ClientSession(headers=auth, timeout=aiohttp.ClientTimeout(total=3)) as http:
            await asyncio.gather(self._holders_loop(http), self._out_loop(http), self._in_loop(http))

    async def _sleep(self, s: float) -> bool:
        try:
            await asyncio.wait_for(self._stop.wait(), s)
            return False
        except asyncio.TimeoutError:
            return True

    async def _holders_loop(self, http: aiohttp.ClientSession) -> None:
        while True:
            try:
                self._holders = await asyncio.get_running_loop().run_in_executor(None, self.fleet.holders)
            except (OSError, ValueError, KeyError):  # a missed refresh: the next one comes 0.3 s later
                pass
            if not await self._sleep(0.3):
                return

    async def _out_loop(self, http: aiohttp.ClientSession) -> None:
        if self.out_gap is None:
            return
        n = 0
        while await self._sleep(self.out_gap):
            iid = self.instances[n % len(self.instances)]
            body = f"out-{n}"
            n += 1
            t = time.time()
            try:
                mid = await asyncio.get_running_loop().run_in_executor(
                    None, self.fleet.target.queue, iid, "5511999990000", body)
            except (OSError, ValueError, KeyError):  # not queued: not counted
                continue
            if mid is not None:
                self.queued[body] = (iid, t, mid)

    async def _in_loop(self, http: aiohttp.ClientSession) -> None:
        if self.in_gap is None:
            return
        n = 0
        while await self._sleep(self.in_gap):
            iid = self.instances[(n * 7) % len(self.instances)]
            body = f"in-{n}"
            n += 1
            holder = self._holders.get(iid)
            w = self.fleet.workers.get(holder or "")
            if w is None:
                self.refused.append((iid, str(holder), "no holder"))
                continue
            try:
                async with http.post(f"http://127.0.0.1:{w.port}/simulator/instances/{iid}/inbound",
                                     json={"from": "5511988887777", "body": body}) as r:
                    if r.status == 200:
                        self.injected[body] = (iid, w.name, time.time())
                    else:
                        self.refused.append((iid, w.name, f"HTTP {r.status}"))
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                self.refused.append((iid, w.name, type(exc).__name__))
