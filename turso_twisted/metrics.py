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

from collections.abc import Iterator
from typing import TYPE_CHECKING

import attrs
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from .service import TursoService

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0)


#: The 403 error codes of L{turso_twisted.policy}: the labels of turso_access_refused.
ACCESS_ERRORS = ("forbidden", "reads_blocked", "writes_blocked", "max_db_size_exceeded")


def request_kind(path: bytes) -> str:
    if path == b"/v2/pipeline":
        return "pipeline"
    if path == b"/pull-updates":
        return "pull-updates"
    return "other"


@attrs.define(eq=False)
class Metrics:
    registry: CollectorRegistry = attrs.field(factory=CollectorRegistry)
    requests: Counter = attrs.field(init=False)
    latency: Histogram = attrs.field(init=False)
    bytes_in: Counter = attrs.field(init=False)
    bytes_out: Counter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        registry = self.registry
        self.requests = Counter("turso_proxy_requests", "Proxied data-port requests",
                                ["kind", "status_class"], registry=registry)
        self.latency = Histogram("turso_proxy_request_duration_seconds",
                                 "Time from a whole request to its whole answer", ["kind"],
                                 buckets=_LATENCY_BUCKETS, registry=registry)
        self.bytes_in = Counter("turso_proxy_received_bytes", "Request body bytes from clients",
                                registry=registry)
        self.bytes_out = Counter("turso_proxy_sent_bytes", "Response body bytes to clients",
                                 registry=registry)

    def observe(self, kind: str, status: int, seconds: float, received: int, sent: int) -> None:
        self.requests.labels(kind, f"{status // 100}xx").inc()
        self.latency.labels(kind).observe(seconds)
        self.bytes_in.inc(received)
        self.bytes_out.inc(sent)

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
             service.data_plane.rejected),
            ("turso_running_cap_refusals", "503 too_many_running: every resident child was busy",
             hibernator.refused_running),
            ("turso_auth_refusals", "Data-port requests refused for their token (401)",
             service.data_port.unauthorized),
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
        auth = service.data_auth
        accepted = CounterMetricFamily("turso_auth_accepted", "Data-port requests let in, by credential",
                                       labels=["credential"])
        for credential, count in auth.accepted.items():
            accepted.add_metric([credential], count)
        yield accepted
        refused = CounterMetricFamily("turso_auth_refused", "Data-port requests refused for their token "
                                      "(401), by reason", labels=["reason"])
        for reason, count in auth.refusals.items():
            refused.add_metric([reason], count)
        yield refused
        forbidden = CounterMetricFamily("turso_access_refused", "Data-port requests refused by a "
                                        "namespace's access rules (403), by error", labels=["error"])
        for code in ACCESS_ERRORS:
            forbidden.add_metric([code], service.data_plane.forbidden.get(code, 0))
        yield forbidden
        yield GaugeMetricFamily("turso_queued_requests", "Requests waiting for their namespace's child",
                                value=supervisor.queued())
        yield GaugeMetricFamily("turso_answers_held_bytes",
                                "Bytes of answers waiting for clients that read slowly",
                                value=service.data_plane.held_bytes)
        yield CounterMetricFamily("turso_answers_held_refusals",
                                  "503 answers_held: TURSO_MAX_HELD_BYTES of answers were waiting",
                                  value=service.data_plane.budget_refusals)
