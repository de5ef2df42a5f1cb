"""The simulated phone's controls, mounted by the daemon under ``/simulator/``
only with the simulator backend (the parent app's bearer check covers them).

    GET  /simulator/instances                     every simulated session
    POST /simulator/instances/{id}/scan           scan the current QR code
    POST /simulator/instances/{id}/inbound        {"from", "body", "chat_id"?, "push_name"?, "is_group"?, "from_me"?}
    GET  /simulator/instances/{id}/sent           what the worker sent through it
    POST /simulator/instances/{id}/drop           drop the connection
    POST /simulator/instances/{id}/logout         unlink the phone
    POST /simulator/instances/{id}/fail-sends     {"count"}: the next sends fail
    POST /simulator/instances/{id}/fail-connects  {"count"}: the next connects fail
    POST /simulator/instances/{id}/stall-connects {"count"}: the next connects hang
    POST /simulator/crash-after-next-send         the process dies right after the next send

A control that does not fit the instance's state is a 409.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from ..backends.simulator import SimulatorBackend, SimulatorError, SimulatorSession
from ..ids import is_valid_instance_id
from .common import http_error, json_response, read_json_object

MOUNT_AT = "/simulator/"
MAX_BODY = 64 * 1024
MAX_COUNT = 1_000_000


@web.middleware
async def _conflicts(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except SimulatorError as exc:  # a control request that does not fit the instance's state
        return json_response({"error": str(exc)}, 409)


# long: one short closure per route over the same backend, read as a table
def simulator_app(sim: SimulatorBackend) -> web.Application:
    """A sub-application to mount at :data:`MOUNT_AT`."""
    app = web.Application(middlewares=[_conflicts])

    def session_of(request: web.Request) -> SimulatorSession:
        iid = request.match_info["id"]
        if not is_valid_instance_id(iid) or iid not in sim.sessions:
            raise http_error(404, "no such simulated instance")
        return sim.sessions[iid]

    async def instances(_: web.Request) -> web.Response:
        return json_response([s.describe() for s in sim.sessions.values()])

    async def scan(request: web.Request) -> web.Response:
        session_of(request).scan()
        return json_response({"ok": True})

    async def inbound(request: web.Request) -> web.Response:
        s = session_of(request)
        data = await read_json_object(request, max_bytes=MAX_BODY)
        frm, body = data.get("from"), data.get("body")
        if not isinstance(frm, str) or not isinstance(body, str) or not body:
            return json_response({"error": "'from' and a non-empty 'body' are required strings"}, 400)
        chat_id = data.get("chat_id")
        push_name = data.get("push_name")
        try:
            wa_id = await s.receive(frm, body, chat_id=chat_id if isinstance(chat_id, str) else None,
                                    push_name=push_name if isinstance(push_name, str) else None,
                                    is_group=bool(data.get("is_group", False)),
                                    from_me=bool(data.get("from_me", False)))
        except ValueError as exc:  # an unusable 'from' / 'chat_id'
            return json_response({"error": str(exc)}, 400)
        return json_response({"wa_message_id": wa_id})

    async def sent(request: web.Request) -> web.Response:
        return json_response(sim.sent(session_of(request).instance_id))

    async def drop(request: web.Request) -> web.Response:
        await session_of(request).drop()
        return json_response({"ok": True})

    async def logout(request: web.Request) -> web.Response:
        await session_of(request).logout()
        return json_response({"ok": True})

    def counter(table: dict[str, int]) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            iid = request.match_info["id"]
            if not is_valid_instance_id(iid):
                return json_response({"error": "invalid instance id"}, 400)
            data = await read_json_object(request, max_bytes=MAX_BODY)
            count = data.get("count")
            if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_COUNT:
                return json_response({"error": "'count' must be an integer >= 0"}, 400)
            table[iid] = count
            return json_response({"ok": True, "count": count})

        return handler

    async def crash_after_send(_: web.Request) -> web.Response:
        sim.crash_after_send = True
        return json_response({"ok": True})

    app.router.add_get("/instances", instances)
    app.router.add_post("/instances/{id}/scan", scan)
    app.router.add_post("/instances/{id}/inbound", inbound)
    app.router.add_get("/instances/{id}/sent", sent)
    app.router.add_post("/instances/{id}/drop", drop)
    app.router.add_post("/instances/{id}/logout", logout)
    app.router.add_post("/instances/{id}/fail-sends", counter(sim.fail_sends))
    app.router.add_post("/instances/{id}/fail-connects", counter(sim.fail_connects))
    app.router.add_post("/instances/{id}/stall-connects", counter(sim.stall_connects))
    app.router.add_post("/crash-after-next-send", crash_after_send)
    return app


def mount_simulator_routes(app: web.Application, sim: SimulatorBackend) -> None:
    app.add_subapp(MOUNT_AT, simulator_app(sim))
