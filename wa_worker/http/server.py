"""The worker's own HTTP server (aiohttp): health, readiness, wake-up and,
with the simulator backend, the simulated phone's controls.

Unauthenticated output carries counts only: no instance ids, phone numbers,
QR codes or secrets. Everything else requires ``Authorization: Bearer
$WORKER_SECRET``.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..backends.simulator import SimulatorBackend, SimulatorError
from ..ids import is_valid_instance_id

if TYPE_CHECKING:
    from ..daemon import Worker

log = logging.getLogger("wa_worker.http")

MAX_BODY = 64 * 1024


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, ensure_ascii=False))


def build_app(worker: "Worker") -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    secret = worker.settings.WORKER_SECRET.get_secret_value().encode()

    def authorized(request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), secret)

    async def read_json(request: web.Request, *, allow_empty: bool = False) -> dict[str, Any]:
        raw = await request.read()
        if not raw.strip():
            if allow_empty:
                return {}
            raise web.HTTPBadRequest(text='{"error":"a JSON body is required"}', content_type="application/json")
        try:
            data = json.loads(raw)
        except ValueError:
            raise web.HTTPBadRequest(text='{"error":"body is not JSON"}', content_type="application/json") from None
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(text='{"error":"body must be a JSON object"}', content_type="application/json")
        return data

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path in ("/", "/health", "/ready"):
            return await handler(request)
        if not authorized(request):
            return _json({"error": "unauthorized"}, 401)
        try:
            return await handler(request)
        except SimulatorError as exc:  # a control request that does not fit the instance's state
            return _json({"error": str(exc)}, 409)

    app.middlewares.append(guard)

    async def health(_: web.Request) -> web.Response:
        return _json(worker.health())

    async def ready(_: web.Request) -> web.Response:
        reasons = worker.not_ready_reasons()
        loops = worker.loop_ages()  # each supervised loop's last success age (names and counts only)
        if reasons:
            return _json({"status": "not_ready", "reasons": reasons, "loops": loops}, 503)
        return _json({"status": "ready", "loops": loops})

    async def wake(request: web.Request) -> web.Response:
        data = await read_json(request, allow_empty=True)
        iid = data.get("instanceId")
        if iid is not None and not is_valid_instance_id(iid):
            return _json({"error": "invalid instanceId"}, 400)
        woken = worker.wake(iid)
        return _json({"ok": True, "woken": woken}, 202)

    app.router.add_get("/", health)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_post("/wake", wake)

    backend = worker.backend
    if isinstance(backend, SimulatorBackend):
        sim: SimulatorBackend = backend

        def session_of(request: web.Request) -> Any:
            iid = request.match_info["id"]
            if not is_valid_instance_id(iid) or iid not in sim.sessions:
                raise web.HTTPNotFound(text='{"error":"no such simulated instance"}', content_type="application/json")
            return sim.sessions[iid]

        async def sim_instances(_: web.Request) -> web.Response:
            return _json([s.describe() for s in sim.sessions.values()])

        async def sim_scan(request: web.Request) -> web.Response:
            session_of(request).scan()
            return _json({"ok": True})

        async def sim_inbound(request: web.Request) -> web.Response:
            s = session_of(request)
            data = await read_json(request)
            frm, body = data.get("from"), data.get("body")
            if not isinstance(frm, str) or not isinstance(body, str) or not body:
                return _json({"error": "'from' and a non-empty 'body' are required strings"}, 400)
            chat_id = data.get("chat_id")
            push_name = data.get("push_name")
            try:
                wa_id = await s.receive(frm, body, chat_id=chat_id if isinstance(chat_id, str) else None,
                                        push_name=push_name if isinstance(push_name, str) else None,
                                        is_group=bool(data.get("is_group", False)),
                                        from_me=bool(data.get("from_me", False)))
            except ValueError as exc:  # an unusable 'from' / 'chat_id'
                return _json({"error": str(exc)}, 400)
            return _json({"wa_message_id": wa_id})

        async def sim_sent(request: web.Request) -> web.Response:
            return _json(sim.sent(session_of(request).instance_id))

        async def sim_drop(request: web.Request) -> web.Response:
            await session_of(request).drop()
            return _json({"ok": True})

        async def sim_logout(request: web.Request) -> web.Response:
            await session_of(request).logout()
            return _json({"ok": True})

        def counter_route(table: dict[str, int]) -> Any:
            async def handler(request: web.Request) -> web.Response:
                iid = request.match_info["id"]
                if not is_valid_instance_id(iid):
                    return _json({"error": "invalid instance id"}, 400)
                data = await read_json(request)
                count = data.get("count")
                if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= 1_000_000:
                    return _json({"error": "'count' must be an integer >= 0"}, 400)
                table[iid] = count
                return _json({"ok": True, "count": count})

            return handler

        async def sim_crash_after_send(_: web.Request) -> web.Response:
            sim.crash_after_send = True
            return _json({"ok": True})

        app.router.add_get("/simulator/instances", sim_instances)
        app.router.add_post("/simulator/instances/{id}/scan", sim_scan)
        app.router.add_post("/simulator/instances/{id}/inbound", sim_inbound)
        app.router.add_get("/simulator/instances/{id}/sent", sim_sent)
        app.router.add_post("/simulator/instances/{id}/drop", sim_drop)
        app.router.add_post("/simulator/instances/{id}/logout", sim_logout)
        app.router.add_post("/simulator/instances/{id}/fail-sends", counter_route(sim.fail_sends))
        app.router.add_post("/simulator/instances/{id}/fail-connects", counter_route(sim.fail_connects))
        app.router.add_post("/simulator/instances/{id}/stall-connects", counter_route(sim.stall_connects))
        app.router.add_post("/simulator/crash-after-next-send", sim_crash_after_send)
    return app
