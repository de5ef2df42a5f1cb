"""A faithful fake of Supabase Storage's object endpoints, served on loopback (aiohttp, in a thread).

The real Storage API (storage-api + PostgreSQL + an S3 backend + Kong) cannot run
here, so the Supabase kit's media calls are tested against this stand-in. It
implements what supabase-js's ``StorageFileApi`` calls and answers as Storage
does (storage-api v1 JSON shapes):

* ``POST /storage/v1/object/<bucket>/<path>`` upload; an existing object is a
  409 ``Duplicate`` unless ``x-upsert: true``. ``PUT`` replaces an existing
  object (404 when there is none). Answer ``{"Key": "<bucket>/<path>", "Id": ...}``.
* ``POST /storage/v1/object/sign/<bucket>/<path>`` ``{"expiresIn": s}`` →
  ``{"signedURL": "/object/sign/<bucket>/<path>?token=<jwt-like>"}`` (relative to
  ``/storage/v1``); a missing object is a 400 whose body says ``"statusCode": "404"``.
* ``GET /storage/v1/object/sign/<bucket>/<path>?token=...``: the bytes with their
  Content-Type, no credentials needed; a wrong or expired token is a 400 ``InvalidJWT``.
* Every other call needs ``Authorization: Bearer <service key>`` and ``apikey``
  (403 otherwise); an unknown bucket is a 404 ``Bucket not found``.

``fail_next`` makes the next calls answer 503 (an outage), ``calls`` records them.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import anyio
from aiohttp import web


@dataclass
class StoredObject:
    data: bytes
    content_type: str
    updated: float = field(default_factory=time.time)


def _err(status: int, code: str, error: str, message: str) -> web.Response:
    return web.json_response({"statusCode": code, "error": error, "message": message}, status=status)


class FakeStorage:
    def __init__(self, service_key: str = "service-role-key-for-tests", buckets: tuple[str, ...] = ("wa-media",),
                 max_bytes: int = 50 * 1024 * 1024) -> None:
        self.service_key = service_key
        self.objects: dict[tuple[str, str], StoredObject] = {}
        self.buckets = set(buckets)
        self.max_bytes = max_bytes
        self.calls: list[tuple[str, str]] = []
        self.fail_next = 0
        self._secret = uuid.uuid4().hex.encode()
        self.port = 0
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: anyio.Event | None = None
        self._token: anyio.lowlevel.EventLoopToken | None = None

    # ------------------------------------------------------------------ server

    @property
    def url(self) -> str:
        """SUPABASE_URL for the function."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "FakeStorage":
        self._thread = threading.Thread(target=anyio.run, args=(self._serve,), daemon=True, name="fake-storage")
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("fake storage did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None and self._token is not None:
            anyio.from_thread.run_sync(self._stop.set, token=self._token)
        if self._thread is not None:
            self._thread.join(10)

    async def _serve(self) -> None:
        self._stop = anyio.Event()
        self._token = anyio.lowlevel.current_token()
        app = web.Application(client_max_size=self.max_bytes + 1)
        app.router.add_route("POST", "/storage/v1/object/sign/{bucket}/{path:.+}", self._sign)
        app.router.add_route("GET", "/storage/v1/object/sign/{bucket}/{path:.+}", self._get_signed)
        app.router.add_route("POST", "/storage/v1/object/{bucket}/{path:.+}", self._upload)
        app.router.add_route("PUT", "/storage/v1/object/{bucket}/{path:.+}", self._upload)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = runner.addresses[0][1]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    # ------------------------------------------------------------------ checks

    def _precheck(self, request: web.Request, *, auth: bool) -> web.Response | None:
        self.calls.append((request.method, request.path))
        if self.fail_next > 0:
            self.fail_next -= 1
            return _err(503, "503", "Service Unavailable", "storage is down (fault injected)")
        if auth:
            bearer = request.headers.get("Authorization", "")
            if bearer != f"Bearer {self.service_key}" or request.headers.get("apikey") != self.service_key:
                return _err(403, "403", "Unauthorized", "Invalid Compact JWS")
        if request.match_info["bucket"] not in self.buckets:
            return _err(404, "404", "Bucket not found", "Bucket not found")
        return None

    def _token_for(self, bucket: str, path: str, expires: int) -> str:
        mac = hmac.new(self._secret, f"{bucket}/{path}:{expires}".encode(), hashlib.sha256).hexdigest()
        return f"{expires}.{mac}"

    # ------------------------------------------------------------------ routes

    async def _upload(self, request: web.Request) -> web.Response:
        denied = self._precheck(request, auth=True)
        if denied is not None:
            return denied
        bucket, path = request.match_info["bucket"], request.match_info["path"]
        data = await request.read()
        if len(data) > self.max_bytes:
            return _err(413, "413", "Payload too large", "The object exceeded the maximum allowed size")
        exists = (bucket, path) in self.objects
        upsert = request.headers.get("x-upsert", "false").lower() == "true"
        if request.method == "POST" and exists and not upsert:
            return _err(409, "409", "Duplicate", "The resource already exists")
        if request.method == "PUT" and not exists:
            return _err(404, "404", "not_found", "Object not found")
        self.objects[(bucket, path)] = StoredObject(data, request.headers.get("Content-Type",
                                                                               "application/octet-stream"))
        return web.json_response({"Key": f"{bucket}/{path}", "Id": str(uuid.uuid4())})

    async def _sign(self, request: web.Request) -> web.Response:
        denied = self._precheck(request, auth=True)
        if denied is not None:
            return denied
        bucket, path = request.match_info["bucket"], request.match_info["path"]
        try:
            body: Any = await request.json()
        except ValueError:
            body = None
        expires_in = body.get("expiresIn") if isinstance(body, dict) else None
        if not isinstance(expires_in, int) or expires_in < 1:
            return _err(400, "400", "Invalid Input", "body/expiresIn must be >= 1")
        if (bucket, path) not in self.objects:
            return _err(400, "404", "not_found", "Object not found")
        token = self._token_for(bucket, path, int(time.time()) + expires_in)
        # storage-api URI-encodes the object's path in the URL it returns
        return web.json_response({"signedURL": f"/object/sign/{quote(f'{bucket}/{path}', safe='/')}?token={token}"})

    async def _get_signed(self, request: web.Request) -> web.Response:
        denied = self._precheck(request, auth=False)
        if denied is not None:
            return denied
        bucket, path = request.match_info["bucket"], request.match_info["path"]
        token = request.query.get("token", "")
        expires_s, _, _mac = token.partition(".")
        valid = expires_s.isdigit() and hmac.compare_digest(token, self._token_for(bucket, path, int(expires_s)))
        if not valid or int(expires_s) < time.time():
            return _err(400, "400", "InvalidJWT", "invalid signature" if not valid else "jwt expired")
        obj = self.objects.get((bucket, path))
        if obj is None:
            return _err(400, "404", "not_found", "Object not found")
        return web.Response(body=obj.data, content_type=obj.content_type.split(";")[0])
