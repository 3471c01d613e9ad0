"""
Prometheus metrics for C{GET /metrics} on the admin port.

Request metrics are counted as requests finish; everything else is read
from the daemon's own counters when Prometheus scrapes, so the hot path
pays for one counter, one histogram and two byte counters per request.
Labels are bounded on purpose: request kind (C{pipeline},
C{pull-updates}, C{other}) and status class (C{2xx} ...), never the
namespace (there can be thousands); per-namespace figures are in
C{GET /v1/namespaces/:name/stats}.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import attrs
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

if TYPE_CHECKING:
    from .dataport import DataPort
    from .proxy import DataPlane
    from .service import TursoService
    from .tokens import DataAuth

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)


#: The 403 error codes of L{turso_twisted.policy}: the labels of turso_access_refused.
ACCESS_ERRORS = ("forbidden", "reads_blocked", "writes_blocked", "max_db_size_exceeded")


def request_kind(path: bytes) -> str:
    if path == b"/v2/pipeline":
        return "pipeline"
    if path == b"/pull-updates":
        return "pull-updates"
    return "other"


def _add_counts(mine: dict[str, Any], theirs: dict[str, Any]) -> None:
    for key, value in theirs.items():
        if isinstance(value, list):
            have = mine.setdefault(key, [0] * len(value))
            for index, count in enumerate(value):
                have[index] += count
        else:
            mine[key] = mine.get(key, 0) + value


@attrs.define(eq=False)
class DataFigures:
    """
    What a process's data plane counted, in one record that can cross a
    process boundary (a worker reports its own; the main process adds
    them up for C{/metrics}).  Counters only grow; the two gauges are
    what is true now.
    """

    #: "<kind> <status class>" -> requests answered.
    requests: dict[str, int] = attrs.field(factory=dict)
    #: kind -> requests per latency bucket (not cumulative; the last is +Inf).
    latency: dict[str, list[int]] = attrs.field(factory=dict)
    latency_sum: dict[str, float] = attrs.field(factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    auth_accepted: dict[str, int] = attrs.field(factory=dict)
    auth_refused: dict[str, int] = attrs.field(factory=dict)
    access_refused: dict[str, int] = attrs.field(factory=dict)
    #: 401s answered at the headers.
    unauthorized: int = 0
    queue_rejections: int = 0
    held_refusals: int = 0
    held_bytes: int = 0
    queued: int = 0
    #: Data workers: client connections moved to, and requests handed over to, another worker.
    moved_connections: int = 0
    handed_requests: int = 0

    def observe(self, kind: str, status: int, seconds: float, received: int, sent: int) -> None:
        """Count one answered request (its kind, status, duration and bytes)."""
        key = f"{kind} {status // 100}xx"
        self.requests[key] = self.requests.get(key, 0) + 1
        buckets = self.latency.get(kind)
        if buckets is None:
            buckets = self.latency[kind] = [0] * (len(LATENCY_BUCKETS) + 1)
        buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum[kind] = self.latency_sum.get(kind, 0.0) + seconds
        self.bytes_in += received
        self.bytes_out += sent

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DataFigures:
        fields = {field.name for field in attrs.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in fields})

    def add(self, other: DataFigures) -> None:
        """Add C{other}'s figures to these."""
        for field in attrs.fields(DataFigures):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if isinstance(mine, dict):
                _add_counts(mine, theirs)
            else:
                setattr(self, field.name, mine + theirs)


def gather(metrics: Metrics, auth: DataAuth, plane: DataPlane, port: DataPort, queued: int) -> DataFigures:
    """The figures of one process's data plane, read from its parts (a copy)."""
    own = metrics.figures
    return DataFigures(
        requests=dict(own.requests), latency={kind: list(counts) for kind, counts in own.latency.items()},
        latency_sum=dict(own.latency_sum), bytes_in=own.bytes_in, bytes_out=own.bytes_out,
        auth_accepted=dict(auth.accepted), auth_refused=dict(auth.refusals),
        access_refused=dict(plane.forbidden),
        unauthorized=port.unauthorized, queue_rejections=plane.rejected, held_refusals=plane.budget.refusals,
        held_bytes=plane.budget.held, queued=queued, moved_connections=plane.moved,
        handed_requests=plane.handed)


@attrs.define(eq=False)
class Metrics:
    """
    The admin port's C{/metrics}: request figures counted as requests
    finish (plain integers: no lock, no label lookup), and the daemon's
    own counters read when Prometheus scrapes.
    """

    registry: CollectorRegistry = attrs.field(factory=CollectorRegistry)
    #: This process's request figures (the rest of its L{DataFigures} is
    #: read from the data plane's parts when reported).
    figures: DataFigures = attrs.field(factory=DataFigures)

    def observe(self, kind: str, status: int, seconds: float, received: int, sent: int) -> None:
        self.figures.observe(kind, status, seconds, received, sent)

    def watch(self, service: TursoService) -> None:
        """
        Report C{service}'s own counters at every scrape.
        """
        self.registry.register(_DaemonCollector(service))

    def render(self) -> bytes:
        return generate_latest(self.registry)


@attrs.define(eq=False)
class _DaemonCollector:
    service: TursoService

    def collect(self) -> Iterator[Metric]:
        service = self.service
        supervisor, hibernator = service.supervisor, service.hibernator
        data = service.data_figures()
        yield from request_families(data)
        live = len(service.state.records)
        running = sum(1 for child in supervisor.children() if child.phase != "starting")
        namespaces = GaugeMetricFamily("turso_namespaces", "Live namespaces by state", labels=["state"])
        namespaces.add_metric(["running"], running)
        namespaces.add_metric(["hibernated"], max(0, live - running))
        yield namespaces
        yield GaugeMetricFamily("turso_namespaces_live", "Live namespaces", value=live)
        counters = (
            ("turso_child_spawns", "tursodb children started", supervisor.spawns),
            ("turso_child_spawn_failures", "Children that failed to start", supervisor.spawn_failures),
            ("turso_child_unexpected_exits", "Children that died on their own", supervisor.unexpected_exits),
            ("turso_hibernations", "Children stopped while idle (scale to zero)", hibernator.hibernations),
            ("turso_queue_rejections", "Requests refused by a full or slow namespace queue",
             data.queue_rejections),
            ("turso_running_cap_refusals", "503 too_many_running: every resident child was busy",
             hibernator.refused_running),
            ("turso_auth_refusals", "Data-port requests refused for their token (401)", data.unauthorized),
            ("turso_gc_archives", "Namespaces archived by the GC", service.gc.archives),
            ("turso_gc_purges", "Archive entries purged by the GC", service.gc.purges),
            ("turso_gc_failures", "GC actions that failed (retried next sweep)", service.gc.failures),
            ("turso_backups", "Backups taken", service.backups.backups),
            ("turso_backup_bytes", "Bytes of backups taken", service.backups.backup_bytes),
            ("turso_backup_seconds", "Time spent taking backups", service.backups.backup_seconds),
            ("turso_restores", "Restores done", service.backups.restores),
            ("turso_forks", "Forks done", service.backups.forks),
            ("turso_state_writes", "Writes of the state file", service.state.writes),
            ("turso_quarantined_files", "Data files no namespace owned, quarantined at start-up",
             len(service.quarantined)),
        )
        for name, documentation, value in counters:
            yield CounterMetricFamily(name, documentation, value=value)
        accepted = CounterMetricFamily("turso_auth_accepted", "Data-port requests let in, by credential",
                                       labels=["credential"])
        for credential, count in data.auth_accepted.items():
            accepted.add_metric([credential], count)
        yield accepted
        refused = CounterMetricFamily("turso_auth_refused", "Data-port requests refused for their token "
                                      "(401), by reason", labels=["reason"])
        for reason, count in data.auth_refused.items():
            refused.add_metric([reason], count)
        yield refused
        forbidden = CounterMetricFamily("turso_access_refused", "Data-port requests refused by a "
                                        "namespace's access rules (403), by error", labels=["error"])
        for code in ACCESS_ERRORS:
            forbidden.add_metric([code], data.access_refused.get(code, 0))
        yield forbidden
        yield GaugeMetricFamily("turso_queued_requests", "Requests waiting for their namespace's child",
                                value=data.queued)
        yield GaugeMetricFamily("turso_answers_held_bytes",
                                "Bytes of answers waiting for clients that read slowly",
                                value=data.held_bytes)
        yield CounterMetricFamily("turso_data_connections_moved",
                                  "Client connections a data worker moved to the worker holding "
                                  "their namespace",
                                  value=data.moved_connections)
        yield CounterMetricFamily("turso_data_requests_handed_over",
                                  "Requests a data worker handed to the worker holding their namespace",
                                  value=data.handed_requests)
        yield CounterMetricFamily("turso_answers_held_refusals",
                                  "503 answers_held: TURSO_MAX_HELD_BYTES of answers were waiting",
                                  value=data.held_refusals)


def request_families(data: DataFigures) -> Iterator[Metric]:
    requests = CounterMetricFamily("turso_proxy_requests", "Proxied data-port requests",
                                   labels=["kind", "status_class"])
    for key, count in sorted(data.requests.items()):
        requests.add_metric(key.split(" ", 1), count)
    yield requests
    latency = HistogramMetricFamily("turso_proxy_request_duration_seconds",
                                    "Time from a whole request to its whole answer", labels=["kind"])
    for kind, counts in sorted(data.latency.items()):
        cumulative, total = [], 0
        for bound, count in zip([*LATENCY_BUCKETS, float("inf")], counts, strict=True):
            total += count
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), total))
        latency.add_metric([kind], cumulative, sum_value=data.latency_sum.get(kind, 0.0))
    yield latency
    yield CounterMetricFamily("turso_proxy_received_bytes", "Request body bytes from clients",
                              value=data.bytes_in)
    yield CounterMetricFamily("turso_proxy_sent_bytes", "Response body bytes to clients",
                              value=data.bytes_out)
