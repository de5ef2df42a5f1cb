"""Per-instance settings from the edge proxy: what the worker knows of each
instance (pacing and call settings, ``proxy_url``) and the one loop per worker
that picks up changes for running instances (``GET /instance-settings``, at
most once a minute; docs/proxy-contract.md).

Discovery items and ``/instance-settings`` items feed the same
:class:`InstanceSettingsBook`. Pacing changes apply to the next send, call
settings to the next call, a ``proxy_url`` to the instance's next connect.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

import anyio

from ..edge.client import EdgeClient, EdgeError, EndpointMissing
from ..storage.journal import Journal, JournalUnavailable
from ..supervise import LoopHealth
from ..timing import Clock
from ..upstream import ProxyChoice, ProxyProblem
from .runner import CallPolicy

log = logging.getLogger("wa_worker.settings")

#: one /instance-settings call per worker per minute at most
SETTINGS_POLL_S = 60.0
MAX_CALL_MESSAGE_CHARS = 4096
#: instances remembered (an answer may list every instance of the proxy, not only this worker's)
MAX_INSTANCES = 200_000

#: a call's first proxy changes get a line each; the rest one line together
LOUD_PROXY_LINES = 10
#: what the proxy said about one instance: (id, settings, settings cleared, proxy_url)
Change = tuple[str, dict[str, Any] | None, bool, ProxyChoice | None]


class InstanceSettingsBook:
    """Each instance's own settings and upstream proxy; ``configure(iid, settings | None)``
    applies pacing (the outbound relay's :meth:`~wa_worker.relays.outbound.OutboundRelay.configure`).
    With a ``journal``, what the edge proxy said is kept across restarts (:meth:`load`)."""

    def __init__(self, configure: Any, journal: Journal | None = None) -> None:
        self._configure = configure
        self._journal = journal
        self._settings: dict[str, dict[str, Any]] = {}
        self._proxy: dict[str, ProxyChoice] = {}
        self.changes: Counter[str] = Counter()  # settings, proxy_url, invalid_proxy_url
        self.unsaved = 0  # changes the journal could not take (kept in memory only)
        self.bad_items = 0  # changes that could not be applied (a bug), skipped

    def load(self) -> int:
        """What the journal kept (before the first proxy call of a start); how many instances."""
        if self._journal is None:
            return 0
        try:
            rows = self._journal.instance_settings()
        except JournalUnavailable as exc:
            log.warning("per-instance settings could not be read from the journal (%s): they come from the "
                        "proxy only", exc)
            return 0
        for iid, settings, url, problem in rows:
            if settings:
                self._settings[iid] = settings
                self._configure(iid, settings)
            if url is not None or problem is not None:
                self._proxy[iid] = ProxyChoice(url, problem)
        return len(rows)

    def _save(self, iids: list[str]) -> None:
        """Keep the instances' current values in the journal: one transaction for them all."""
        if self._journal is None:
            return
        rows = []
        for iid in iids:
            proxy = self._proxy.get(iid, ProxyChoice())
            rows.append((iid, self._settings.get(iid), proxy.url, proxy.problem))
        try:
            self._journal.save_instance_settings(rows)
        except JournalUnavailable:
            self.unsaved += len(rows)  # applied all the same; the next change saves them again

    def apply_all(self, changes: Iterable[Change]) -> int:
        """Record what the proxy said, ``(iid, settings, cleared, proxy)`` each (None: it did not
        say); how many instances changed. A new proxy is logged per instance for the first few of
        a call, then one line sums them up (a start's full list has thousands). A change that
        cannot be applied is counted and skipped."""
        changed: list[str] = []
        proxies = 0
        for iid, settings, cleared, proxy in changes:
            try:
                if self._apply_one(iid, settings, cleared, proxy, loud=proxies < LOUD_PROXY_LINES):
                    changed.append(iid)
                    proxies += proxy is not None
            except Exception:  # one bad item never ends the loop nor holds the others
                self.bad_items += 1
                log.exception("%s: could not apply its settings (skipped)", iid)
        if changed:
            self._save(changed)
        if proxies > LOUD_PROXY_LINES:
            log.info("per-instance settings: %d instance(s) changed, %d of them their upstream proxy (each "
                     "applied at the instance's next connect)", len(changed), proxies)
        return len(changed)

    def apply(self, iid: str, settings: dict[str, Any] | None, *, cleared: bool = False,
              proxy: ProxyChoice | None = None) -> bool:
        """:meth:`apply_all` for one instance; True if anything changed."""
        return self.apply_all([(iid, settings, cleared, proxy)]) == 1

    def _apply_one(self, iid: str, settings: dict[str, Any] | None, cleared: bool, proxy: ProxyChoice | None,
                   *, loud: bool) -> bool:
        changed = False
        if settings is not None or cleared:
            new = dict(settings) if settings else None
            if new != self._settings.get(iid) and (iid in self._settings or self._room()):
                if new is None:
                    self._settings.pop(iid, None)
                else:
                    self._settings[iid] = new
                self._configure(iid, new)
                self.changes["settings"] += 1
                changed = True
        if proxy is not None and proxy != self._proxy.get(iid, ProxyChoice()):
            if iid in self._proxy or self._room():
                self._proxy_changed(iid, proxy, loud)
                changed = True
        return changed

    def _room(self) -> bool:
        return len(self._settings) + len(self._proxy) < MAX_INSTANCES

    def _proxy_changed(self, iid: str, proxy: ProxyChoice, loud: bool) -> None:
        if proxy == ProxyChoice():
            self._proxy.pop(iid, None)
        else:
            self._proxy[iid] = proxy
        if proxy.problem is not None:
            self.changes["invalid_proxy_url"] += 1
            log.warning("%s: proxy_url rejected (%s): the instance does not connect until the proxy gives a "
                        "valid one (or null to dial directly)", iid, proxy.problem)
        else:
            self.changes["proxy_url"] += 1
            log.log(logging.INFO if loud else logging.DEBUG,
                    "%s: upstream proxy %s (applies at the instance's next connect)", iid, proxy.shown)

    def settings(self, iid: str) -> dict[str, Any] | None:
        return self._settings.get(iid)

    def proxy_for(self, iid: str) -> str | None:
        """The instance's upstream proxy URL (None: dial directly). Raises
        :class:`~wa_worker.upstream.ProxyProblem` when the proxy gave an unusable one."""
        choice = self._proxy.get(iid)
        if choice is None:
            return None
        if choice.problem is not None:
            raise ProxyProblem(f"invalid proxy_url from the edge proxy: {choice.problem}")
        return choice.url

    def proxy_shown(self, iid: str) -> str:
        """"direct", "invalid" or the redacted URL (never its credentials)."""
        return self._proxy.get(iid, ProxyChoice()).shown

    def call_policy(self, iid: str, base: CallPolicy) -> CallPolicy:
        """``base`` (CALL_REJECT, CALL_REJECT_MESSAGE) with the instance's ``call_reject`` and
        ``call_reject_message`` over it (a value of the wrong type is ignored)."""
        own = self._settings.get(iid)
        if not own:
            return base
        reject, message = base.reject, base.message
        if isinstance(own.get("call_reject"), bool):
            reject = own["call_reject"]
        text = own.get("call_reject_message")
        if isinstance(text, str) and len(text) <= MAX_CALL_MESSAGE_CHARS:
            message = text
        return CallPolicy(reject=reject, message=message)


class SettingsPoller:
    """``GET /instance-settings?since=<cursor>`` once a minute; off for good (until restart)
    when the proxy does not have it (404/405/501: one INFO line)."""

    def __init__(self, edge: EdgeClient, book: InstanceSettingsBook, clock: Clock, *,
                 every_s: float | None = None) -> None:
        self.edge = edge
        self.book = book
        self.clock = clock
        self.every_s = every_s if every_s is not None else SETTINGS_POLL_S  # (read late: tests shorten it)
        self.cursor: str | None = None
        self.supported: bool | None = None  # None: not asked yet
        self.calls = 0
        self._last_call: float | None = None  # monotonic; a restarted loop keeps the minute's pace
        self.health = LoopHealth("instance settings", clock, stale_after_s=3 * (self.every_s + edge.timeout_s))

    async def poll_once(self) -> None:
        """One call (never sooner than ``every_s`` after the previous one); its items applied.
        Raises :class:`EdgeError` (EndpointMissing included)."""
        if self._last_call is not None:
            await self.clock.sleep(max(0.0, self._last_call + self.every_s - self.clock.monotonic()))
        self._last_call = self.clock.monotonic()
        self.calls += 1
        items, cursor = await self.edge.instance_settings(self.cursor)
        if self.supported is None:
            log.info("the proxy offers /instance-settings: settings changes reach running instances "
                     "within %.0f s", self.every_s)
        self.supported = True
        self.book.apply_all((i.id, i.settings, i.settings_cleared, i.proxy) for i in items)
        self.cursor = cursor

    async def first(self, timeout_s: float) -> None:
        """The first call, before stored sessions are resumed (so they connect with their
        ``proxy_url``); bounded, and never raising."""
        with anyio.move_on_after(timeout_s):
            try:
                await self.poll_once()
            except EndpointMissing:
                self._switch_off()
            except EdgeError:
                pass

    def _switch_off(self) -> None:
        if self.supported is not False:
            log.info("the proxy has no /instance-settings: per-instance settings come from discovery items "
                     "only (until restart)")
        self.supported = False
        self.health.finished = True

    async def run(self) -> None:
        """The loop (under ``supervise.forever``): one call a minute, until the proxy says it has none."""
        while self.supported is not False:
            try:
                await self.poll_once()
            except EndpointMissing:
                self._switch_off()
                return
            except EdgeError:
                pass  # logged by the client; the next minute asks again
            self.health.ok()
