"""The dev page's view of the worker: its ``/health`` and its simulator controls,
asked by the proxy on the page's behalf (the page talks to its own origin only).

Loopback, short timeouts, the secret never leaves the proxy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

HEALTH_TIMEOUT_S = 1.0
CONTROL_TIMEOUT_S = 5.0
SIMULATOR_ACTIONS = frozenset({"scan", "inbound"})

WORKER_LINK_KEY: web.AppKey["WorkerLink"] = web.AppKey("worker_link")


@dataclass(frozen=True, slots=True)
class WorkerLink:
    base_url: str
    secret: str

    async def health(self) -> dict[str, Any]:
        """What the page shows: ``{"reachable": False}`` or the worker's health summary."""
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)) as s:
                async with s.get(self.base_url + "/health") as resp:
                    data = await resp.json(content_type=None) if resp.status == 200 else None
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            data = None
        if not isinstance(data, dict):
            return {"reachable": False}
        summary: dict[str, Any] = {"reachable": True}
        for key in ("status", "backend", "uptime_s", "instances"):
            if key in data:
                summary[key] = data[key]
        return summary

    async def simulator(self, instance_id: str, action: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """``POST /simulator/instances/{id}/{action}`` on the worker: its status and JSON answer."""
        url = f"{self.base_url}/simulator/instances/{instance_id}/{action}"
        headers = {"Authorization": f"Bearer {self.secret}"}
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CONTROL_TIMEOUT_S)) as s:
                async with s.post(url, json=body, headers=headers) as resp:
                    try:
                        data = await resp.json(content_type=None)
                    except ValueError:
                        data = None
                    status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError):
            return 502, {"error": "the worker is not reachable"}
        if status == 404 and not (isinstance(data, dict) and data.get("error")):
            return 409, {"error": "the worker does not run the simulator (start `wa-worker dev --simulator`)"}
        if not isinstance(data, dict):
            data = {}
        if status in (401, 403):
            return 502, {"error": "the worker refused the proxy's secret"}
        return status, data
