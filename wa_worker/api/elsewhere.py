"""An API call for an instance this worker does not hold, in a fleet (docs/api.md, "Fleets").

With leases on, :class:`HolderFinder` asks the proxy's optional ``GET /lease-holder`` who
holds the instance (one call per instance per ``CACHE_S`` at most: concurrent askers share
it, the answer is remembered; bounded by the edge client's EDGE_TIMEOUT_S). When the holder
said where API clients reach it (its ``API_PUBLIC_URL``), the call is answered ``307`` with
``Location: <api_url><the same path and query>``; otherwise ``404 instance_not_here``.
Never a redirect to this worker itself (a stale answer naming it): that is a 404.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
from aiohttp import web

from ..edge.client import EdgeError
from ..edge.models import LeaseHolder
from ..ids import is_valid_instance_id
from ..timing import Clock
from .errors import api_error

log = logging.getLogger("wa_worker.api")

CACHE_S = 2.0  # at most one GET /lease-holder per instance in this time
CACHE_MAX = 4096  # instances remembered at once (the oldest answers are forgotten first)


@dataclass
class _Lookup:
    at: float
    done: anyio.Event = field(default_factory=anyio.Event)
    holder: LeaseHolder | None = None


class HolderFinder:
    """Who holds an instance's lease, when leases are on (``leases_on()``); None otherwise."""

    def __init__(self, lookup: Callable[[str], Awaitable[LeaseHolder | None]], *, leases_on: Callable[[], bool],
                 worker_id: str, api_url: str | None, clock: Clock | None = None, cache_s: float = CACHE_S,
                 cache_max: int = CACHE_MAX) -> None:
        self.lookup = lookup
        self.leases_on = leases_on
        self.worker_id = worker_id
        self.api_url = api_url
        self.clock = clock or Clock()
        self.cache_s = cache_s
        self.cache_max = cache_max
        self.calls = 0  # GET /lease-holder calls made
        self._cache: dict[str, _Lookup] = {}

    async def find(self, instance_id: str) -> LeaseHolder | None:
        """The holder (a proxy error or no answer: None, remembered like an answer)."""
        if not self.leases_on() or not is_valid_instance_id(instance_id):
            return None
        now = self.clock.monotonic()
        entry = self._cache.get(instance_id)
        if entry is not None and (not entry.done.is_set() or now - entry.at < self.cache_s):
            await entry.done.wait()
            return entry.holder
        self._cache.pop(instance_id, None)  # re-inserted last: the dict's order is the age order
        self._make_room(now)
        entry = self._cache[instance_id] = _Lookup(now)
        self.calls += 1
        try:
            entry.holder = await self.lookup(instance_id)
        except EdgeError as exc:
            log.info("%s: could not ask the proxy who holds it (%s): answering instance_not_here", instance_id, exc,
                     extra={"instance_id": instance_id})
        except BaseException:
            if self._cache.get(instance_id) is entry:  # cancelled: the next asker asks again
                del self._cache[instance_id]
            raise
        finally:
            entry.done.set()
        return entry.holder

    def _make_room(self, now: float) -> None:
        if len(self._cache) < self.cache_max:
            return
        for iid in [i for i, e in self._cache.items() if e.done.is_set() and now - e.at >= self.cache_s]:
            del self._cache[iid]
        while len(self._cache) >= self.cache_max:
            oldest = next((i for i, e in self._cache.items() if e.done.is_set()), None)
            if oldest is None:
                break  # every entry is a lookup in flight: let this one in anyway (bounded by the askers)
            del self._cache[oldest]

    def redirect(self, holder: LeaseHolder | None) -> str | None:
        """The holder's API base URL, unless it is this worker (or none was given)."""
        if holder is None or holder.api_url is None or holder.worker_id == self.worker_id:
            return None
        if self.api_url is not None and holder.api_url == self.api_url:
            return None  # another id at our own address: never a redirect loop
        return holder.api_url


def not_here(instance_id: str, worker_id: str | None = None) -> web.HTTPException:
    where = f" (worker {worker_id} holds it and gave no API_PUBLIC_URL)" if worker_id else ""
    return api_error(404, "instance_not_here", f"this worker does not hold instance {instance_id!r}{where} (see "
                                               "docs/api.md, \"Fleets\")", worker_id=worker_id)


async def _holder(finder: HolderFinder | None, instance_id: str) -> tuple[LeaseHolder | None, str | None]:
    if finder is None:
        return None, None
    holder = await finder.find(instance_id)
    return holder, finder.redirect(holder)


def _redirect(request: web.Request, instance_id: str, holder: LeaseHolder, base: str) -> web.HTTPException:
    location = base + request.raw_path  # the same path and query, as the client sent them
    return api_error(307, "instance_elsewhere", f"worker {holder.worker_id} holds instance {instance_id!r}: send "
                                                "the same request (same token, same Idempotency-Key) to Location",
                     headers={"Location": location}, worker_id=holder.worker_id, location=location)


async def elsewhere(finder: HolderFinder | None, request: web.Request, instance_id: str) -> web.HTTPException | None:
    """``307 instance_elsewhere`` to the holder of ``instance_id`` when there is one to send the
    client to, else None."""
    holder, base = await _holder(finder, instance_id)
    return _redirect(request, instance_id, holder, base) if holder is not None and base is not None else None


async def not_held(finder: HolderFinder | None, request: web.Request, instance_id: str) -> web.HTTPException:
    """The answer for an instance this worker does not hold: 307 to its holder, or 404
    ``instance_not_here`` (naming the holder when one is known)."""
    holder, base = await _holder(finder, instance_id)
    if holder is not None and base is not None:
        return _redirect(request, instance_id, holder, base)
    known = holder.worker_id if holder is not None and finder is not None and holder.worker_id != finder.worker_id \
        else None
    return not_here(instance_id[:128], known)
