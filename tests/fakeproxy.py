"""A real HTTP edge proxy on loopback (aiohttp) for end-to-end tests.

It keeps the Node proxy's harshest semantics: a queued message is returned by
every ``/queued-messages`` call until ``/mark-sent`` or ``/mark-failed``
succeeds, so a worker that re-sends on a lost acknowledgement is caught. With
``claim=True`` it hands each message out once instead (at most ``poll_limit``
per call), like the Supabase kit's ``queued -> sending`` (the benchmarks). Faults
are injected per endpoint (``fail``: next N calls answer 500; ``hang``: next N
calls sleep past the client's timeout; ``status``: a fixed answer).

With ``lease_book`` set (:class:`tests.fakeleases.LeaseBook`) it is a fleet proxy: ``POST /leases``,
fencing of instance-scoped calls (409 ``lease_lost``), claim tokens, ``prior_claim``; each message is
handed out once per lease token (re-offered, with ``prior_claim``, only after the lease moved).
Without it ``/leases`` is a 404, as on every proxy before leases.

With ``events=True`` it serves ``GET /events`` (the push channel) as a faithful
long poll: every enqueue (and :meth:`FakeProxy.push_event`) is numbered; a call
answers at once with the events newer than its ``cursor`` (without one: a
``queued`` event per instance with messages waiting), else holds until one
arrives or ``wait`` (capped at ``events_wait_cap_s``) passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakeleases import LeaseBook

SECRET = "test-secret-0123456789"


@dataclass
class FakeProxy:
    secret: str = SECRET
    shape: str = "list"  # "list" | "object" (response shapes of the two proxy families)
    batch: bool = False  # support GET /queued-messages without instanceId
    mark_failed_supported: bool = True
    upload_media_status: int | None = None  # e.g. 404: a proxy without /upload-media
    uploads: dict[tuple[str, str], bytes] = field(default_factory=dict)  # (instanceId, wa_message_id) -> bytes
    upload_headers: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    upload_posts: int = 0
    on_upload: Any = None  # called with (instanceId, wa_message_id) once the bytes are stored, before answering
    on_inbound: Any = None  # called with the body once stored, before answering
    claim: bool = False  # hand each message out once (see the module docstring)
    poll_limit: int | None = None  # messages per /queued-messages answer (None: all)
    honor_limit: bool = True  # apply the worker's ?limit= (False: a proxy that ignores it)
    limits_seen: list[str | None] = field(default_factory=list)
    items: dict[str, dict[str, Any]] = field(default_factory=dict)  # extra discovery-item fields per instance  # the ?limit= of every per-instance poll
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)
    queue: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    sent_marks: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    failed_marks: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    failed_codes: dict[str, list[str | None]] = field(default_factory=lambda: defaultdict(list))
    inbound: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[dict[str, Any]] = field(default_factory=list)
    message_status_posts: list[list[dict[str, Any]]] = field(default_factory=list)  # each /message-status batch
    message_status: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # latest per message
    calls: Counter[str] = field(default_factory=Counter)
    fail: Counter[str] = field(default_factory=Counter)
    hang: Counter[str] = field(default_factory=Counter)
    fixed_status: dict[str, int] = field(default_factory=dict)
    random_fault_rate: float = 0.0
    lose_response_rate: float = 0.0  # do the work, then answer 503 (a lost acknowledgement)
    inbound_posts: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    hang_s: float = 3.0
    gone: set[str] = field(default_factory=set)
    enqueued_at: dict[str, float] = field(default_factory=dict)
    sent_at: dict[str, float] = field(default_factory=dict)
    on_queue_call: Any = None
    # GET /instance-settings (issue #12): None = the proxy does not have it (404); else
    # instance id -> (change number, its item); set_settings() records a change
    instance_settings: dict[str, tuple[int, dict[str, Any]]] | None = None
    settings_since: list[str | None] = field(default_factory=list)  # the ?since= of every call
    settings_delay_s: float = 0.0  # each /instance-settings answer takes this long
    lease_book: LeaseBook | None = None  # a fleet proxy (see the module docstring)
    lease_calls: list[dict[str, Any]] = field(default_factory=list)  # every POST /leases body
    lease_answers: list[dict[str, Any]] = field(default_factory=list)
    holder_answers: dict[str, Any] = field(default_factory=dict)  # instance id -> GET /lease-holder's answer
    worker_ids: dict[str, set[str | None]] = field(default_factory=lambda: defaultdict(set))  # endpoint -> X-Worker-Id
    tokens_seen: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))  # endpoint -> lease_token
    # GET /events (push channel): off by default (a proxy without it answers 404)
    events: bool = False
    events_wait_cap_s: float = 25.0
    event_log: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (number, event)
    events_queries: list[dict[str, str]] = field(default_factory=list)  # query + X-Worker-Id of every call
    url: str = ""
    _event_added: asyncio.Event | None = None
    _closing: bool = False
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)  # set by stop(): held calls answer now
    _runner: web.AppRunner | None = None
    _inbound_keys: set[tuple[str, str]] = field(default_factory=set)

    # ---------------------------------------------------------------- helpers for tests

    def add_instance(self, iid: str, status: str = "DISCONNECTED", **item: Any) -> None:
        """``item``: extra fields of its discovery item (``pair_phone``, ``settings`` ...)."""
        self.instances[iid] = {"status": status, "qr_code": None}
        self.items[iid] = item

    def enqueue(self, iid: str, mid: str, to: str, body: str | None, **fields: Any) -> None:
        """A queued message; ``fields`` are the optional content fields (type, media_url, ...)."""
        record: dict[str, Any] = {"id": mid, "to": to, "body": body, **fields}
        if body is None:
            del record["body"]
        self.queue[iid].append(record)
        self.enqueued_at[mid] = time.monotonic()
        self.push_event({"type": "queued", "instanceId": iid})

    def push_event(self, event: dict[str, Any]) -> None:
        """Number ``event`` and answer the ``/events`` calls waiting for one."""
        self.event_log.append((len(self.event_log) + 1, event))
        if self._event_added is not None:
            self._event_added.set()
            self._event_added = None

    def set_settings(self, iid: str, **item: Any) -> None:
        """A change of ``iid``'s ``settings`` / ``proxy_url`` (turns /instance-settings on)."""
        table = self.instance_settings if self.instance_settings is not None else {}
        self.instance_settings = table
        table[iid] = (max((n for n, _ in table.values()), default=0) + 1, {"id": iid, **item})

    def status_of(self, iid: str) -> str | None:
        inst = self.instances.get(iid)
        return inst["status"] if inst else None

    def statuses_of(self, iid: str) -> list[dict[str, Any]]:
        return [s for s in self.statuses if s["instanceId"] == iid]

    def inbound_ids(self) -> list[str]:
        return [p["wa_message_id"] for p in self.inbound]

    # ---------------------------------------------------------------- server

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/disconnected-instances", self._disconnected)
        app.router.add_post("/update-status", self._update_status)
        app.router.add_get("/queued-messages", self._queued)
        app.router.add_post("/mark-sent", self._mark_sent)
        app.router.add_post("/mark-failed", self._mark_failed)
        app.router.add_post("/inbound", self._inbound)
        app.router.add_post("/upload-media", self._upload_media)
        app.router.add_post("/message-status", self._message_status)
        app.router.add_get("/instance-settings", self._instance_settings)
        app.router.add_post("/leases", self._leases)
        app.router.add_get("/lease-holder", self._lease_holder)
        if self.events:
            app.router.add_get("/events", self._events)
        return app

    async def start(self, port: int = 0) -> "FakeProxy":
        self._stopping = asyncio.Event()
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        self._closing = True
        self._stopping.set()  # hanging calls answer now: the runner's cleanup waits for every handler
        if self._event_added is not None:  # held /events calls answer now
            self._event_added.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _hold(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if the proxy stops meanwhile."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _gate(self, request: web.Request, endpoint: str) -> web.Response | None:
        self.calls[endpoint] += 1
        self.worker_ids[endpoint].add(request.headers.get("X-Worker-Id"))
        if request.headers.get("Authorization") != f"Bearer {self.secret}":
            return web.json_response({"error": "unauthorized"}, status=401)
        if self.hang[endpoint] > 0:
            self.hang[endpoint] -= 1
            await self._hold(self.hang_s)
            return web.json_response({"error": "slow"}, status=504)
        if self.fail[endpoint] > 0:
            self.fail[endpoint] -= 1
            return web.json_response({"error": "injected"}, status=500)
        if endpoint in self.fixed_status:
            return web.json_response({"error": "fixed"}, status=self.fixed_status[endpoint])
        if self.random_fault_rate and self.rng.random() < self.random_fault_rate:
            if self.rng.random() < 0.3:
                await self._hold(self.hang_s)
            return web.json_response({"error": "random"}, status=503)
        return None

    # ---------------------------------------------------------------- leases

    def _lease_refused(self, endpoint: str) -> web.Response:
        assert self.lease_book is not None
        self.lease_book.refused[endpoint] += 1
        return web.json_response({"error": "lease_lost"}, status=409)

    def _fenced(self, endpoint: str, iid: Any, token: Any) -> web.Response | None:
        """409 when leases are on and ``token`` (if sent) is not the instance's current lease token."""
        self.tokens_seen[endpoint].append(token)
        if self.lease_book is None or token is None:
            return None
        if not self.lease_book.valid(iid, int(token) if isinstance(token, str) and token.isdigit() else token):
            return self._lease_refused(endpoint)
        return None

    async def _leases(self, request: web.Request) -> web.Response:
        if self.lease_book is None:
            self.calls["leases"] += 1
            return web.json_response({"error": "no such route"}, status=404)
        if (r := await self._gate(request, "leases")) is not None:
            return r
        body = await request.json()
        # the strict writer: api_url only when the worker has one to give (API_PUBLIC_URL with API_TOKEN)
        assert set(body) - {"api_url"} == {"worker_id", "capacity", "held", "release"}, body
        assert "api_url" not in body or isinstance(body["api_url"], str), body
        assert request.headers.get("X-Worker-Id") == body["worker_id"]
        self.lease_calls.append(body)
        needing = {i: int(self.items.get(i, {}).get("priority", 0)) for i in self.instances if i not in self.gone}
        answer = self.lease_book.call(body, needing, lambda i: {k: v for k, v in self.items.get(i, {}).items()})
        self.lease_answers.append(answer)
        return web.json_response(answer)

    async def _lease_holder(self, request: web.Request) -> web.Response:
        """``GET /lease-holder?instanceId=``: the live lease's holder and its api_url, else 404."""
        if self.lease_book is None:
            self.calls["lease-holder"] += 1
            return web.json_response({"error": "no such route"}, status=404)
        if (r := await self._gate(request, "lease-holder")) is not None:
            return r
        iid = request.query.get("instanceId", "")
        if iid in self.holder_answers:  # a scripted answer (a stale or hostile proxy)
            return web.json_response(self.holder_answers[iid])
        found = self.lease_book.holder(iid)
        if found is None:
            return web.json_response({"error": "no holder"}, status=404)
        return web.json_response(found)

    def _wrap(self, key: str, items: list[Any]) -> Any:
        return items if self.shape == "list" else {key: items}

    async def _disconnected(self, request: web.Request) -> web.Response:
        if (r := await self._gate(request, "disconnected-instances")) is not None:
            return r
        items = [{"id": i, "priority": 0, **self.items.get(i, {})} for i, v in self.instances.items()
                 if v["status"] in ("DISCONNECTED", "CONNECTING")]
        return web.json_response(self._wrap("instances", items))

    async def _events(self, request: web.Request) -> web.Response:
        if (r := await self._gate(request, "events")) is not None:
            return r
        self.events_queries.append({**request.query, "worker_id": request.headers.get("X-Worker-Id", "")})
        try:
            wait = min(self.events_wait_cap_s, max(0.0, float(request.query.get("wait", "0"))))
        except ValueError:
            return web.json_response({"error": "wait must be a number"}, status=400)
        cursor = request.query.get("cursor")
        seen = int(cursor) if cursor is not None and cursor.isdigit() else None
        deadline = time.monotonic() + wait
        while True:
            top = len(self.event_log)
            if seen is None:  # a first call: whatever is waiting now
                due = [{"type": "queued", "instanceId": i} for i, q in self.queue.items() if q]
                seen = top
            else:
                due = [e for n, e in self.event_log if n > seen]
            left = deadline - time.monotonic()
            if due or left <= 0 or self._closing:
                return web.json_response({"events": due, "cursor": str(top)})
            if self._event_added is None:
                self._event_added = asyncio.Event()
            added = self._event_added
            try:
                await asyncio.wait_for(added.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def _instance_settings(self, request: web.Request) -> web.Response:
        if (r := await self._gate(request, "instance-settings")) is not None:
            return r
        if self.instance_settings is None:
            return web.json_response({"error": "unknown endpoint"}, status=404)
        since = request.query.get("since")
        self.settings_since.append(since)
        await asyncio.sleep(self.settings_delay_s)
        floor = int(since) if since is not None and since.isdigit() else 0
        changed = [item for n, item in self.instance_settings.values() if n > floor]
        top = max((n for n, _ in self.instance_settings.values()), default=0)
        return web.json_response({"instances": changed, "cursor": str(top)})

    async def _update_status(self, request: web.Request) -> web.Response:
        if (r := await self._gate(request, "update-status")) is not None:
            return r
        body = await request.json()
        iid = body.get("instanceId")
        if iid in self.gone or iid not in self.instances:
            return web.json_response({"error": "not found"}, status=404)
        assert set(("instanceId", "status", "qr_code")) <= set(body), body
        if (r := self._fenced("update-status", iid, body.get("lease_token"))) is not None:
            return r
        self.statuses.append(body)
        self.instances[iid].update(status=body["status"], qr_code=body["qr_code"])
        return web.json_response({"ok": True})

    async def _queued(self, request: web.Request) -> web.Response:
        if (r := await self._gate(request, "queued-messages")) is not None:
            return r
        iid = request.query.get("instanceId")
        if self.on_queue_call is not None:
            self.on_queue_call(iid)
        if iid is None:
            if not self.batch:
                return web.json_response({"error": "instanceId required"}, status=400)
            items: list[dict[str, Any]] = []
            worker = request.headers.get("X-Worker-Id")
            for i in list(self.queue):
                if self.lease_book is not None and self.lease_book.holder_of(i) != worker:
                    continue  # with leases: only the instances leased to the caller
                room = None if self.poll_limit is None else self.poll_limit - len(items)
                if room is not None and room <= 0:
                    break
                items.extend({**m, "instanceId": i} for m in self._offer(i, room))
            return web.json_response({"messages": items})
        if iid in self.gone:
            return web.json_response({"error": "not found"}, status=404)
        if (r := self._fenced("queued-messages", iid, request.query.get("lease_token"))) is not None:
            return r  # a claim refused claims nothing
        asked = request.query.get("limit")
        self.limits_seen.append(asked)
        limit = self.poll_limit
        if self.honor_limit and asked is not None and asked.isdigit():
            limit = int(asked) if limit is None else min(limit, int(asked))
        return web.json_response(self._wrap("messages", self._offer(iid, limit)))

    def _offer(self, iid: str, limit: int | None) -> list[dict[str, Any]]:
        """Up to ``limit`` queued messages of ``iid``, oldest first; claimed (removed) in claim mode.
        With leases: each message once per lease token, with its ``lease_token`` (and ``prior_claim``
        when another token claimed it before without an acknowledgement)."""
        q = self.queue.get(iid, [])
        if self.lease_book is not None:
            cur = self.lease_book.current(iid)
            if cur is None:
                return []
            out = []
            for m in q:
                if limit is not None and len(out) >= limit:
                    break
                if self.lease_book.claimable(iid, m["id"]):
                    prior = self.lease_book.claim(m["id"], cur[1], iid)
                    out.append({**m, "lease_token": cur[1], **({"prior_claim": True} if prior else {})})
            return out
        end = len(q) if limit is None else limit
        out = q[:end]
        if self.claim:
            del q[:end]
        return out

    def _remove(self, mid: str) -> None:
        if self.claim:
            return  # handed out already
        for q in self.queue.values():
            q[:] = [m for m in q if m["id"] != mid]

    async def _mark_sent(self, request: web.Request) -> web.Response:
        if (r := await self._gate(request, "mark-sent")) is not None:
            return r
        body = await request.json()
        self.tokens_seen["mark-sent"].append(body.get("lease_token"))
        if self.lease_book is not None and not self.lease_book.ack_allowed(body["messageId"], body.get("lease_token")):
            return self._lease_refused("mark-sent")
        self.sent_marks[body["messageId"]].append(body["wa_message_id"])
        self.sent_at.setdefault(body["messageId"], time.monotonic())
        self._remove(body["messageId"])
        return self._maybe_lose({"ok": True})

    async def _mark_failed(self, request: web.Request) -> web.Response:
        if not self.mark_failed_supported:
            self.calls["mark-failed"] += 1
            return web.json_response({"error": "no such route"}, status=404)
        if (r := await self._gate(request, "mark-failed")) is not None:
            return r
        body = await request.json()
        self.tokens_seen["mark-failed"].append(body.get("lease_token"))
        if self.lease_book is not None and not self.lease_book.ack_allowed(body["messageId"], body.get("lease_token")):
            return self._lease_refused("mark-failed")
        self.failed_marks[body["messageId"]].append(body["error"])
        self.failed_codes[body["messageId"]].append(body.get("error_code"))
        self._remove(body["messageId"])
        return self._maybe_lose({"ok": True})

    async def _inbound(self, request: web.Request) -> web.Response:
        if (r := await self._gate(request, "inbound")) is not None:
            return r
        body = json.loads(await request.read())
        self.tokens_seen["inbound"].append(body.pop("lease_token", None))  # a fact: never refused for it
        self.inbound_posts += 1
        key = (body["instanceId"], body["wa_message_id"])
        if key not in self._inbound_keys:  # (instanceId, wa_message_id) is unique, as the contract asks
            self._inbound_keys.add(key)
            self.inbound.append(body)
            if self.on_inbound is not None:
                self.on_inbound(body)
        return self._maybe_lose({"ok": True})

    async def _message_status(self, request: web.Request) -> web.Response:
        if (r := await self._gate(request, "message-status")) is not None:
            return r
        body = json.loads(await request.read())
        statuses = body["statuses"]
        assert isinstance(statuses, list) and 1 <= len(statuses) <= 100, len(statuses)
        self.message_status_posts.append(statuses)
        for st in statuses:
            self.tokens_seen["message-status"].append(st.pop("lease_token", None))  # a fact: never refused
            assert set(st) == {"instanceId", "messageId", "wa_message_id", "status", "timestamp", "recipient"}, st
            self.message_status[(st["instanceId"], st["wa_message_id"])] = st
        return self._maybe_lose({"ok": True})

    async def _upload_media(self, request: web.Request) -> web.Response:
        if self.upload_media_status is not None:
            self.calls["upload-media"] += 1
            return web.json_response({"error": "no such route"}, status=self.upload_media_status)
        if (r := await self._gate(request, "upload-media")) is not None:
            return r
        key = (request.query["instanceId"], request.query["wa_message_id"])
        self.tokens_seen["upload-media"].append(request.query.get("lease_token"))  # a fact: never refused
        data = bytearray()
        async for chunk in request.content.iter_chunked(64 * 1024):
            data += chunk
        self.upload_posts += 1
        # idempotent per (instanceId, wa_message_id): a repeat replaces the same object
        self.uploads[key] = bytes(data)
        self.upload_headers[key] = {k: request.headers.get(k, "") for k in ("Content-Type", "X-Filename", "X-Sha256")}
        if self.on_upload is not None:
            self.on_upload(*key)
        return self._maybe_lose({"url": f"{self.url}/media/{key[0]}/{key[1]}"})

    def _maybe_lose(self, ok: dict[str, Any]) -> web.Response:
        if self.lose_response_rate and self.rng.random() < self.lose_response_rate:
            return web.json_response({"error": "response lost"}, status=503)
        return web.json_response(ok)
