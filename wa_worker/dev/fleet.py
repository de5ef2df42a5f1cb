"""The dev proxy's fleet routes (docs/proxy-contract.md, "Leases and fencing" and "GET /events").

    POST /leases   {"worker_id", "capacity", "held": [{"instanceId", "token", "unsent"?}], "release": [...]}
                   → {"ttl_s", "leases": [{"instanceId", "token"} | a grant with the discovery fields],
                      "requeued"?, "unsent_ignored"?}  (the last two when an item listed unsent)
    GET  /lease-holder?instanceId=<id> → {"instanceId", "worker_id", "api_url"} | 404 {"error": "no holder"}
    GET  /events?wait=<s>&cursor=<c>   (X-Worker-Id) → {"events": [...], "cursor": "..."}
    GET  /dev/fleet    (dev API) the workers, the fenced calls refused, the waiting /events calls

The rules live in :mod:`wa_worker.dev.leasing` (one SQLite transaction per call)
and :mod:`wa_worker.dev.events` (the long poll).
"""

from __future__ import annotations

import math
from typing import Any

from aiohttp import web

from ..config import check_public_url
from ..http.common import read_json_object
from ..ids import is_valid_instance_id
from .events import MAX_EVENT_WAIT_S, BadCursor, TooManyWaiters
from .leasing import WORKER_ID_RE, LeaseRequest
from .proxy import MAX_REQUEST_BYTES, PROXY_KEY, ApiError, DevProxy, worker_header

MAX_LEASE_ITEMS = 10_000
MAX_UNSENT_PER_ITEM = 1_000  # the worker sends at most 1,000 per instance (and 2,000 per call)
MAX_MESSAGE_ID_CHARS = 256
MAX_CAPACITY = 1_000_000
DEFAULT_CAPACITY = 500


def _unsent(item: dict[str, Any], key: str) -> tuple[str, ...]:
    ids = item.get("unsent")
    if ids is None:
        return ()
    if (not isinstance(ids, list) or len(ids) > MAX_UNSENT_PER_ITEM
            or not all(isinstance(m, str) and 0 < len(m) <= MAX_MESSAGE_ID_CHARS for m in ids)):
        raise ApiError(400, f"{key}[].unsent must be a list of at most {MAX_UNSENT_PER_ITEM} message ids")
    return tuple(ids)


def _lease_items(data: dict[str, Any], key: str,
                 unsent: list[tuple[str, int, tuple[str, ...]]] | None = None) -> tuple[tuple[str, int], ...]:
    """``held`` or ``release``: (instance, token) pairs; each item's ``unsent`` ids appended to ``unsent``."""
    items = data.get(key) or []
    if not isinstance(items, list) or len(items) > MAX_LEASE_ITEMS:
        raise ApiError(400, f"{key} must be a list of at most {MAX_LEASE_ITEMS} items")
    out = []
    for item in items:
        if not isinstance(item, dict) or not is_valid_instance_id(item.get("instanceId")):
            raise ApiError(400, f"each {key} item needs a valid instanceId")
        token = item.get("token")
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < 2**63:
            raise ApiError(400, f"each {key} item needs its token (a non-negative integer)")
        out.append((item["instanceId"], token))
        ids = _unsent(item, key)
        if ids and unsent is not None:
            unsent.append((item["instanceId"], token, ids))
    return tuple(out)


def _request(data: dict[str, Any], header: str | None) -> LeaseRequest:
    worker_id = data.get("worker_id")
    if not isinstance(worker_id, str) or not WORKER_ID_RE.fullmatch(worker_id):
        raise ApiError(400, "worker_id must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    if header is not None and header != worker_id:
        raise ApiError(400, "X-Worker-Id and worker_id differ")
    capacity = data.get("capacity", DEFAULT_CAPACITY)
    if not isinstance(capacity, int) or isinstance(capacity, bool) or not 0 <= capacity <= MAX_CAPACITY:
        raise ApiError(400, f"capacity must be an integer between 0 and {MAX_CAPACITY}")
    api_url = data.get("api_url")
    if api_url is not None:
        try:
            api_url = check_public_url(api_url) if isinstance(api_url, str) else None
        except ValueError:
            api_url = None
        if api_url is None:
            raise ApiError(400, "api_url must be an http(s) URL without credentials, query or fragment")
    unsent: list[tuple[str, int, tuple[str, ...]]] = []
    return LeaseRequest(worker_id, capacity, _lease_items(data, "held", unsent), _lease_items(data, "release", unsent),
                        api_url, tuple(unsent))


def _seconds(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


async def leases(request: web.Request) -> web.Response:
    """``POST /leases``: renew, release, grant (fair share) and revoke, in one transaction."""
    proxy: DevProxy = request.app[PROXY_KEY]
    req = _request(await read_json_object(request, max_bytes=MAX_REQUEST_BYTES), worker_header(request))
    answer = proxy.store.lease(req, proxy.lease_ttl_s)
    proxy.leases_called(req.worker_id)
    proxy.notify_leases(answer.notify)
    for iid in answer.granted:
        proxy.emit("lease", iid, holder=req.worker_id, change="granted")
    for iid in answer.revoked:
        proxy.emit("lease", iid, holder=req.worker_id, change="revoked")
    for iid in answer.released:
        proxy.emit("lease", iid, holder=req.worker_id, change="released")
    out: dict[str, Any] = {"ttl_s": _seconds(proxy.lease_ttl_s), "leases": answer.leases}
    if answer.requeued is not None:
        out.update(requeued=[mid for mid, _ in answer.requeued], unsent_ignored=answer.unsent_ignored)
        proxy.handed_back(answer.requeued, answer.unsent_ignored)
    return web.json_response(out)


async def lease_holder(request: web.Request) -> web.Response:
    """``GET /lease-holder?instanceId=<id>``: who holds a live lease, and where API clients reach it."""
    proxy: DevProxy = request.app[PROXY_KEY]
    iid = request.query.get("instanceId")
    if not is_valid_instance_id(iid):
        raise ApiError(400, "instanceId is required (a valid instance id)")
    found = proxy.store.lease_holder_of(str(iid))
    if found is None:
        return web.json_response({"error": "no holder"}, status=404)
    return web.json_response(found)


def _wait(raw: str | None) -> float:
    if raw is None:
        return MAX_EVENT_WAIT_S
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, "wait must be a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise ApiError(400, "wait must be a number of seconds")
    return min(value, MAX_EVENT_WAIT_S)


async def events(request: web.Request) -> web.Response:
    """``GET /events``: a long poll for queued work and lease changes (:mod:`wa_worker.dev.events`)."""
    proxy: DevProxy = request.app[PROXY_KEY]
    worker = worker_header(request)
    wait_s = _wait(request.query.get("wait"))

    def alive() -> bool:
        transport = request.transport
        return transport is not None and not transport.is_closing()

    def resync(worker_id: str | None, limit: int) -> list[dict[str, Any]]:
        queued = [{"type": "queued", "instanceId": i} for i in proxy.store.leased_with_queued(worker_id, limit)]
        return ([{"type": "leases"}] if worker_id is not None else []) + queued[:limit - 1]

    try:
        answer = await proxy.events.wait(worker, request.query.get("cursor"), wait_s, alive=alive, resync=resync)
    except BadCursor as exc:
        raise ApiError(400, str(exc)) from None
    except TooManyWaiters:
        return web.json_response({"error": "too many waiting /events calls; retry later"}, status=503,
                                 headers={"Retry-After": "1"})
    return web.json_response(answer)


async def dev_fleet(request: web.Request) -> web.Response:
    """``GET /dev/fleet``: what a fleet test or a person checks (no secrets in it)."""
    proxy: DevProxy = request.app[PROXY_KEY]
    return web.json_response({"ttl_s": _seconds(proxy.lease_ttl_s), "workers": proxy.store.workers(proxy.lease_ttl_s),
                              "refused": dict(proxy.refused), "unsent": dict(proxy.unsent),
                              "events_waiting": proxy.events.waiters})


async def _close_events(app: web.Application) -> None:
    app[PROXY_KEY].events.close()


def add_fleet_routes(app: web.Application) -> None:
    """The routes, and the app's shutdown ending every waiting ``/events`` call at once."""
    app.router.add_post("/leases", leases)
    app.router.add_get("/lease-holder", lease_holder)
    app.router.add_get("/events", events)
    app.router.add_get("/dev/fleet", dev_fleet)
    app.on_shutdown.append(_close_events)
