"""``/metrics``: the worker's numbers in the Prometheus text format (docs/metrics.md).

One :class:`~prometheus_client.CollectorRegistry` per worker (tests run several
in one process). Almost everything is read from the worker's own state at
scrape time by :class:`WorkerCollector` (the counters the relays, runners, edge
client and HTTP guard already keep); the proxy latency histogram lives in the
edge client; process CPU/RSS come from prometheus-client's ProcessCollector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .api.app import ApiStats
from .backends.base import Backend
from .edge.client import EdgeClient
from .events import EventLog
from .fdguard import FdBudget
from .http.guard import ConnectionGuard
from .instances.manager import InstanceManager
from .relays.inbound import InboundRelay
from .relays.outbound import OutboundRelay
from .storage.journal import Journal, JournalUnavailable
from .supervise import LoopHealth
from .timing import Clock

PREFIX = "wa_worker"


@dataclass
class MetricSources:
    """The worker parts the collector reads (no reference to the worker itself: no import cycle)."""

    backend: Backend
    edge: EdgeClient
    journal: Journal
    inbound: InboundRelay
    outbound: OutboundRelay
    manager: InstanceManager
    fds: FdBudget
    guard: ConnectionGuard
    loops: Callable[[], list[LoopHealth]]
    ready: Callable[[], bool]
    clock: Clock
    version: str
    events: EventLog | None = None  # the live event log, with API_TOKEN
    api: ApiStats | None = None  # the direct API's door, with API_TOKEN


def _counter(name: str, doc: str, value: float | None = None, *, labels: Iterable[str] = (),
             samples: Mapping[tuple[str, ...], float] | None = None) -> CounterMetricFamily:
    m = CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value, labels=list(labels) if samples is not None else None)
    for key, v in (samples or {}).items():
        m.add_metric(list(key), v)
    return m


def _gauge(name: str, doc: str, value: float | None = None, *, labels: Iterable[str] = (),
           samples: Mapping[tuple[str, ...], float] | None = None) -> GaugeMetricFamily:
    m = GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value, labels=list(labels) if samples is not None else None)
    for key, v in (samples or {}).items():
        m.add_metric(list(key), v)
    return m


def _by(counts: Mapping[str, int]) -> dict[tuple[str, ...], float]:
    return {(k,): float(v) for k, v in sorted(counts.items())}


class WorkerCollector(Collector):
    """Reads the worker's state at scrape time (cheap: counters in memory, a few COUNT queries)."""

    def __init__(self, src: MetricSources) -> None:
        self.src = src

    def collect(self) -> Iterator[Metric]:
        yield from self._instances()
        yield from self._messages()
        yield from self._journal()
        yield from self._proxy()
        yield from self._process()
        yield from self._loops()
        yield from self._events()
        yield from self._api()

    def _api(self) -> Iterator[Metric]:
        api = self.src.api
        yield _counter("api_requests", "Direct API requests let in (authenticated, within the rate limit; 0 without "
                       "API_TOKEN)", api.allowed if api is not None else 0)
        refused = api.refused if api is not None else {}
        yield _counter("api_refused", "Direct API requests refused at the door, by reason", labels=("reason",),
                       samples={(r,): float(refused.get(r, 0)) for r in ("unauthorized", "rate_limited")})

    def _events(self) -> Iterator[Metric]:
        s = self.src.events.stats() if self.src.events is not None else {}
        yield _counter("events_published", "Live events published (GET /api/events; 0 without API_TOKEN)",
                       s.get("published", 0))
        yield _gauge("events_streams", "Open event streams", s.get("streams", 0))
        yield _counter("events_slow_clients_cut", "Event streams cut: the client fell too far behind",
                       s.get("slow_clients_cut", 0))
        yield _counter("events_lost", "Live events that could not be kept (the journal refused them and memory "
                       "was full)", s.get("lost", 0))

    def _instances(self) -> Iterator[Metric]:
        c = self.src.manager.counts()
        states = {s: c[s] for s in ("connected", "connecting", "reconnecting", "restarting_after_crash")}
        yield _gauge("instances", "Instances by state", labels=["state"], samples=_by(states))
        yield _counter("instance_crashes", "Runner crashes (a bug ended an instance's lifecycle)", c["crashes"])
        yield _gauge("instance_failing_loops", "Instance loops failing right now", c["failing_loops"])
        stats = self.src.manager.ctx.stats
        yield _counter("connects", "Sessions that reached CONNECTED", stats.connects)
        yield _counter("reconnects", "Reconnection attempts scheduled after a disconnect", stats.reconnects)
        yield _counter("disconnects", "Disconnections by reason", labels=["reason"], samples=_by(stats.disconnects))
        yield _counter("qr_codes", "QR codes shown (each new code counts)", stats.qr_codes)

    def _messages(self) -> Iterator[Metric]:
        out, inb = self.src.outbound, self.src.inbound
        yield _counter("messages_sent", "Outbound messages sent to WhatsApp", out.sent)
        yield _counter("messages_failed", "Outbound messages failed, by the error_code sent to /mark-failed",
                       labels=["error_code"], samples=_by(out.failed_by_code))
        yield _counter("messages_duplicates_suppressed", "Queued messages already handled (not sent twice)",
                       out.duplicates_suppressed)
        yield _counter("inbound_received", "Messages received from WhatsApp", inb.received)
        yield _counter("inbound_delivered", "Received messages the proxy took (POST /inbound)", inb.delivered)
        yield _counter("inbound_dead_lettered", "Received messages moved to the dead-letter table",
                       inb.dead_lettered)

    def _journal(self) -> Iterator[Metric]:
        journal = self.src.journal
        try:
            counts = journal.counts()
            ages = journal.oldest_pending_age_s()
        except JournalUnavailable:
            counts, ages = {}, {}
        backlog = {
            "inbound": counts.get("inbound_pending", 0) + self.src.inbound.memory_pending,
            "acks": counts.get("outbound_pending_acks", 0),
            "sending": counts.get("outbound_in_flight", 0),
        }
        yield _gauge("journal_backlog", "Journal rows waiting: inbound (for /inbound), acks (for "
                     "/mark-sent|/mark-failed), sending (a send in flight)", labels=["queue"], samples=_by(backlog))
        yield _gauge("journal_oldest_pending_age_seconds", "Age of the oldest row waiting (0: none)",
                     labels=["queue"], samples={(k,): v for k, v in sorted(ages.items())})
        yield _gauge("journal_dead_letters", "Rows in the dead-letter table (kept 7 days)",
                     labels=["kind"], samples={("all",): float(counts.get("dead_letter", 0)),
                                               ("inbound",): float(counts.get("inbound_dead_letter", 0))})
        yield _gauge("journal_writable", "1 while the state store accepts writes", 1 if journal.writable else 0)

    def _proxy(self) -> Iterator[Metric]:
        edge = self.src.edge
        yield _counter("proxy_calls", "Calls to the edge proxy by endpoint", labels=["endpoint"],
                       samples=_by(edge.calls))
        yield _counter("proxy_failures", "Failed calls to the edge proxy by endpoint (timeouts, refused, "
                       "HTTP errors)", labels=["endpoint"], samples=_by(edge.failures))
        yield _counter("proxy_rejected_records", "Malformed records in proxy answers, ignored",
                       sum(edge.rejected.values()))
        last = edge.last_ok_monotonic
        yield _gauge("proxy_last_ok_age_seconds", "Seconds since the proxy last answered (-1: never)",
                     -1 if last is None else max(0.0, self.src.clock.monotonic() - last))
        leases = self.src.manager.leases
        yield _gauge("leases_held", "Instance leases this worker holds (0 without leases)", len(leases.held))
        yield _gauge("leases_fenced", "1 while self-fenced (no lease renewal for ttl/2)", 1 if leases.fenced else 0)
        yield _counter("leases_lost", "Leases lost, by cause: not_renewed (missing from an answer), refused (409 "
                       "lease_lost)", labels=["cause"],
                       samples={("not_renewed",): leases.counts["lost"] - leases.counts["revoked_409"],
                                ("refused",): leases.counts["revoked_409"]})
        yield _counter("claims_handed_back", "Claims never begun handed back with a lease (unsent), by outcome: "
                       "requeued (put back to queued by the proxy), refused (not taken back)", labels=["outcome"],
                       samples={("requeued",): leases.counts["unsent_requeued"],
                                ("refused",): leases.counts["unsent_refused"]})
        relay_bytes = getattr(self.src.backend, "relay_bytes", None)  # neonize only: its CONNECT relay
        up, down = relay_bytes() if callable(relay_bytes) else (0, 0)
        yield _counter("relay_bytes", "Bytes through the CONNECT relay (WhatsApp traffic of neonize sessions)",
                       labels=["direction"], samples={("up",): up, ("down",): down})

    def _process(self) -> Iterator[Metric]:
        fds = self.src.fds.usage()
        yield _gauge("fds", "Open file descriptors by kind (sockets -1: not told apart)", labels=["kind"],
                     samples={("open",): fds.open, ("sockets",): fds.sockets, ("files",): fds.files})
        yield _gauge("fd_limit", "The descriptor limit (soft RLIMIT_NOFILE)", fds.limit)
        g = self.src.guard.stats()
        yield _gauge("http_connections", "Open connections to the worker's HTTP server", g["connections"])
        yield _gauge("http_connections_max", "Connections the HTTP server accepts at once", g["max_connections"])
        yield _counter("http_connection_events", "HTTP server connections: accepted, refused (over the cap), "
                       "timed_out (no complete request in time), idle_closed", labels=["event"],
                       samples=_by({k: g[k] for k in ("accepted", "refused", "timed_out", "idle_closed")}))
        yield _gauge("ready", "1 while /ready answers 200", 1 if self.src.ready() else 0)
        yield _gauge("info", "Constant 1; the labels describe the worker", labels=["backend", "version"],
                     samples={(self.src.backend.name, self.src.version): 1})

    def _loops(self) -> Iterator[Metric]:
        now = self.src.clock.monotonic()
        loops = self.src.loops()
        yield _gauge("loop_last_ok_age_seconds", "Seconds since each supervised loop last succeeded (-1: never)",
                     labels=["loop"], samples={(h.name,): -1 if h.last_ok is None else now - h.last_ok
                                               for h in loops})
        yield _gauge("loop_failing", "1 while a supervised loop is failing", labels=["loop"],
                     samples={(h.name,): 1 if h.failing(now) else 0 for h in loops})
        yield _counter("loop_failures", "Failures of each supervised loop", labels=["loop"],
                       samples={(h.name,): h.failures for h in loops})


def package_version() -> str:
    try:
        return version("wa-worker")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class WorkerMetrics:
    """The worker's registry: its collector, the edge latency histogram, process CPU/RSS."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, src: MetricSources) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(WorkerCollector(src))
        self.registry.register(src.edge.latency)
        ProcessCollector(namespace=PREFIX, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
