"""Run the reference proxy on a background thread (tests, notebooks, embedding).

    with BackgroundProxy(DevStore(":memory:"), "s3cret-value") as proxy:
        httpx.get(proxy.url + "/disconnected-instances", headers=...)

The thread runs its own anyio event loop; its task group owns the proxy's
wake-up forwarder.
"""

from __future__ import annotations

import threading

import anyio
import anyio.from_thread
import anyio.lowlevel
from aiohttp import web

from .app import create_app
from .proxy import DEFAULT_LEASE_TTL_S, PROXY_KEY, DevProxy, ProxyEventCallback
from .store import DevStore


class BackgroundProxy:
    def __init__(
        self,
        store: DevStore,
        secret: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        wake_url: str | None = None,
        on_event: ProxyEventCallback | None = None,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
    ) -> None:
        self.store = store
        self.app = create_app(store, secret, wake_url=wake_url, on_event=on_event, lease_ttl_s=lease_ttl_s)
        self.host = host
        self.port = port
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._serving = False
        self._token: anyio.lowlevel.EventLoopToken | None = None
        self._stop: anyio.Event | None = None

    @property
    def proxy(self) -> DevProxy:
        return self.app[PROXY_KEY]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> "BackgroundProxy":
        self._thread = threading.Thread(target=anyio.run, args=(self._serve,), name="dev-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the dev proxy did not start")
        if self._error is not None:
            raise self._error
        if not self._serving:
            raise RuntimeError("the dev proxy failed to start")
        return self

    async def _serve(self) -> None:
        self._token = anyio.lowlevel.current_token()
        self._stop = anyio.Event()
        web_runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        try:
            await web_runner.setup()
            site = web.TCPSite(web_runner, self.host, self.port)
            await site.start()
            if web_runner.addresses:
                self.port = web_runner.addresses[0][1]
            self._serving = True
        except OSError as exc:  # e.g. a busy port: start() raises it
            self._error = exc
            await web_runner.cleanup()
            return
        finally:
            self._ready.set()  # anything else: start() says so, the traceback is on stderr
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.proxy.run_waker)
                await self._stop.wait()
                tg.cancel_scope.cancel()
        finally:
            await web_runner.cleanup()

    def stop(self, timeout: float = 10.0) -> None:
        if self._token is not None and self._stop is not None and self._thread and self._thread.is_alive():
            anyio.from_thread.run_sync(self._stop.set, token=self._token)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "BackgroundProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
