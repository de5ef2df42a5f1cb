"""``GET /api/instances``, ``GET /api/instances/{id}``, ``GET /api/instances/{id}/qr``.

Read-only, from the manager's snapshots (:class:`~wa_worker.instances.runner.InstanceSnapshot`):
only the instances this worker holds; any other id is ``404 instance_not_here``, or in a
fleet ``307 instance_elsewhere`` to the worker that holds it (:mod:`.elsewhere`).
The QR is rendered from the raw code the runner holds (a PNG, in a thread, one
at a time; the last one per instance is kept), as JSON with a data URL or, for
``Accept: image/png``, as the bytes.
"""

from __future__ import annotations

import base64

import anyio
from aiohttp import web

from ..backends.qr import qr_png_data_url
from ..ids import is_valid_instance_id
from ..instances.runner import InstanceSnapshot
from .elsewhere import HolderFinder, not_held
from .errors import api_error
from .models import ErrorBody, Instance, InstanceList, Qr
from .openapi import Answer, Operation, Param
from .sender import Instances

INSTANCE_ID = Param("id", "path", "the instance id (as the proxy names it)",
                    pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
NOT_HERE = Answer("no worker holds that instance, or its holder gave no API_PUBLIC_URL (instance_not_here; "
                  "error.worker_id names the holder when known)", ErrorBody)
ELSEWHERE = Answer("in a fleet: another worker holds the instance (instance_elsewhere); send the same request, "
                   "with the same token, to Location", ErrorBody, headers=("Location",))
_CACHE_MAX = 1024


async def held(instances: Instances, request: web.Request, finder: HolderFinder | None) -> InstanceSnapshot:
    """The snapshot of the path's instance; when this worker does not hold it, 307 to the worker
    that does (leases on and it gave its address) or 404 ``instance_not_here``."""
    iid = request.match_info["id"]
    snap = instances.snapshot(iid) if is_valid_instance_id(iid) else None
    if snap is None:
        raise await not_held(finder, request, iid)
    return snap


def instance_model(snap: InstanceSnapshot) -> Instance:
    return Instance.model_validate(dict(
        id=snap.instance_id, status=snap.status, state=snap.state, since=snap.since, phone_number=snap.phone_number,
        jid=snap.jid, push_name=snap.push_name, qr_available=snap.qr is not None, reason=snap.reason,
        detail=snap.detail, reason_at=snap.reason_at, ban_code=snap.ban_code, ban_expires_at=snap.ban_expires_at))


def wants_png(request: web.Request) -> bool:
    """``Accept`` names image/png (or image/*) and not JSON."""
    accept = request.headers.get("Accept", "").lower()
    return ("image/png" in accept or "image/*" in accept) and "application/json" not in accept


def instance_operations(instances: Instances, finder: HolderFinder | None = None) -> list[Operation]:
    render_limiter = anyio.CapacityLimiter(1)
    rendered: dict[str, tuple[str, str]] = {}  # instance id -> (raw QR, its data URL)

    async def render(iid: str, raw: str) -> str:
        cached = rendered.get(iid)
        if cached is not None and cached[0] == raw:
            return cached[1]
        url = await anyio.to_thread.run_sync(qr_png_data_url, raw, limiter=render_limiter)
        if len(rendered) >= _CACHE_MAX:
            rendered.clear()
        rendered[iid] = (raw, url)
        return url

    async def list_instances(_: web.Request) -> web.Response:
        body = InstanceList(instances=[instance_model(s) for s in instances.snapshots()])
        return web.json_response(body.model_dump(mode="json"))

    async def get_instance(request: web.Request) -> web.Response:
        return web.json_response(instance_model(await held(instances, request, finder)).model_dump(mode="json"))

    async def get_qr(request: web.Request) -> web.Response:
        snap = await held(instances, request, finder)
        if snap.qr is None:
            if snap.state == "connected":
                raise api_error(409, "already_connected", "the instance is connected: there is no QR code to scan")
            raise api_error(409, "qr_not_ready", f"no QR code right now (instance {snap.state}): try again in a "
                                                 "few seconds", headers={"Retry-After": "2"})
        url = await render(snap.instance_id, snap.qr)
        if wants_png(request):
            png = base64.b64decode(url.split(",", 1)[1])
            return web.Response(body=png, content_type="image/png", headers={"Cache-Control": "no-store"})
        body = Qr(qr=url, pair_code=snap.pair_code)
        return web.json_response(body.model_dump(mode="json", exclude_none=True), headers={"Cache-Control": "no-store"})

    return [
        Operation("get", "/instances", list_instances, "listInstances", "the instances this worker holds",
                  answers={200: Answer("every instance this worker holds, by id", InstanceList)}),
        Operation("get", "/instances/{id}", get_instance, "getInstance", "one instance's status",
                  params=(INSTANCE_ID,),
                  answers={200: Answer("the instance", Instance), 307: ELSEWHERE, 404: NOT_HERE}),
        Operation("get", "/instances/{id}/qr", get_qr, "getInstanceQr",
                  "the QR code to scan (JSON data URL, or image/png with Accept: image/png)",
                  params=(INSTANCE_ID,),
                  answers={200: Answer("the QR code (and the pairing code, when pairing by phone number)", Qr,
                                       png=True),
                           307: ELSEWHERE, 404: NOT_HERE,
                           409: Answer("no QR now: already_connected, or qr_not_ready (Retry-After)", ErrorBody,
                                       headers=("Retry-After",))}),
    ]
