"""A small synchronous client of the dev proxy's API, used by the CLI helpers."""

from __future__ import annotations

import os
from typing import Any

import httpx

from .state import DevPaths

PROXY_URL_ENV = "WA_DEV_PROXY_URL"
DEFAULT_PROXY_URL = "http://127.0.0.1:8787"


class ClientError(Exception):
    """One line for the user (never contains the secret)."""


def resolve_proxy_url(paths: DevPaths, explicit: str | None = None) -> str:
    """``--proxy-url``, else ``$WA_DEV_PROXY_URL``, else the URL the running
    ``wa-worker dev`` wrote to the state folder, else ``http://127.0.0.1:8787``."""
    if explicit:
        return explicit.rstrip("/")
    env = os.environ.get(PROXY_URL_ENV)
    if env:
        return env.rstrip("/")
    try:
        recorded = paths.proxy_url_file.read_text().strip()
    except OSError:
        recorded = ""
    if recorded.startswith(("http://", "https://")):
        return recorded.rstrip("/")
    return DEFAULT_PROXY_URL


def resolve_worker_url(paths: DevPaths, explicit: str | None = None) -> str:
    """``--worker-url``, else the URL the running ``wa-worker dev`` wrote to the state folder."""
    if explicit:
        return explicit.rstrip("/")
    try:
        recorded = paths.worker_url_file.read_text().strip()
    except OSError:
        recorded = ""
    if not recorded.startswith(("http://", "https://")):
        raise ClientError(
            f"no worker is running in {paths.root} (start one with `wa-worker dev --simulator`, "
            "or pass --worker-url / --dir)"
        )
    return recorded.rstrip("/")


class WorkerClient:
    """The running worker's simulator controls (``/simulator/...``), with the dev secret."""

    def __init__(self, base_url: str, secret: str, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {secret}"},
                                  timeout=timeout, trust_env=False)

    def __enter__(self) -> "WorkerClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise ClientError(f"cannot reach the worker at {self.base_url}: is `wa-worker dev` running?") from None
        except httpx.HTTPError as exc:
            raise ClientError(f"request to the worker failed: {type(exc).__name__}") from None

    def _require_simulator(self) -> None:
        resp = self._request("GET", "/health")
        backend = resp.json().get("backend") if resp.status_code == 200 else None
        if backend != "simulator":
            raise ClientError(
                f"the worker at {self.base_url} runs the {backend or 'unknown'} backend, not the simulator: "
                "this helper needs `wa-worker dev --simulator`"
            )

    def simulator(self, instance_id: str, action: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """``POST /simulator/instances/{id}/{action}``; :class:`ClientError` with the worker's reason."""
        self._require_simulator()
        resp = self._request("POST", f"/simulator/instances/{instance_id}/{action}", json=body or {})
        if resp.status_code in (401, 403):
            raise ClientError("the worker refused the secret (check --dir, --secret and $WORKER_SECRET)")
        try:
            data = resp.json()
        except ValueError:
            data = {}
        if resp.status_code == 404:
            raise ClientError(f"the simulator has no instance {instance_id} (see `wa-worker dev instance list`)")
        if resp.status_code >= 400 or not isinstance(data, dict):
            message = data.get("error") if isinstance(data, dict) else None
            raise ClientError(f"the simulator refused: {message or f'HTTP {resp.status_code}'}")
        return data


class DevClient:
    def __init__(self, base_url: str, secret: str, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {secret}"},
            timeout=timeout,
            trust_env=False,  # loopback: never through an HTTP(S)_PROXY
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "DevClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise ClientError(
                f"cannot reach the dev proxy at {self.base_url}: is `wa-worker dev` running? "
                "(see --proxy-url / --dir)"
            ) from None
        except httpx.HTTPError as exc:
            raise ClientError(f"request to the dev proxy failed: {type(exc).__name__}") from None
        if resp.status_code in (401, 403):
            raise ClientError(
                "the dev proxy refused the secret (it uses the one in its state folder: check --dir, "
                "--secret and $WORKER_SECRET)"
            )
        try:
            data = resp.json()
        except ValueError:
            data = {}
        if resp.status_code >= 400:
            message = data.get("error") if isinstance(data, dict) else None
            raise ClientError(message or f"the dev proxy answered HTTP {resp.status_code}")
        if not isinstance(data, dict):
            raise ClientError("unexpected answer from the dev proxy")
        return data

    def list_instances(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/dev/instances").get("instances", []))

    def add_instance(self, instance_id: str, priority: int = 0, pair_phone: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"id": instance_id, "priority": priority}
        if pair_phone is not None:
            body["pair_phone"] = pair_phone
        return dict(self._call("POST", "/dev/instances", json=body)["instance"])

    def set_settings(self, instance_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /dev/instances/<id>/settings``: ``settings`` merged (null removes a key), ``proxy_url``."""
        return dict(self._call("POST", f"/dev/instances/{instance_id}/settings", json=body)["instance"])

    def queue(self, instance_id: str, to: str, body: str, fields: dict[str, Any] | None = None) -> dict[str, Any]:
        """Queue a message; ``fields`` are its content fields (``type``, ``media_base64``, ...)."""
        payload = {**(fields or {}), "instanceId": instance_id, "to": to, "body": body}
        data = self._call("POST", "/dev/messages", json=payload)
        return dict(data["message"])

    def messages(self, instance_id: str | None = None, limit: int = 50) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if instance_id:
            params["instanceId"] = instance_id
        return self._call("GET", "/dev/messages", params=params)
