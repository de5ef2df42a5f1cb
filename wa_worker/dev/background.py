"""Run the reference proxy on a background thread (tests, notebooks, embedding).

    with BackgroundProxy(Store(":memory:"), "s3cret-value") as proxy:
        httpx.get(proxy.url + "/disconnected-instances", headers=...)
"""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web

from .proxy import PROXY_KEY, DevProxy, ProxyEventCallback, create_app
from .store import Store


class BackgroundProxy:
    def __init__(
        self,
        store: Store,
        secret: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        wake_url: str | None = None,
        on_event: ProxyEventCallback | None = None,
    ) -> None:
        self.store = store
        self.app = create_app(store, secret, wake_url=wake_url, on_event=on_event)
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None

    @property
    def proxy(self) -> DevProxy:
        return self.app[PROXY_KEY]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> "BackgroundProxy":
        self._thread = threading.Thread(target=self._main, name="dev-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the dev proxy did not start")
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, self.port)
            await site.start()
            if self._runner.addresses:
                self.port = self._runner.addresses[0][1]
        except BaseException as exc:  # report to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self._runner.cleanup()

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "BackgroundProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
