"""
End to end: metrics, per-namespace stats and access logs.
"""

from __future__ import annotations

import json
import re
from typing import Any

from twisted.internet.defer import inlineCallbacks

from .daemon import Daemon, run_replica, wait_for, with_data_workers
from .test_e2e import SELECT_1, E2ETestCase, bearer, get_json, treq


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" ([0-9.e+-]+)$"
    match = re.search(pattern, text, re.MULTILINE)
    if match is None:
        raise AssertionError(f"{name} {labels} not in metrics")
    return float(match.group(1))


class ObservabilityTests(E2ETestCase):
    @inlineCallbacks
    def test_metrics_stats_and_access_log(self) -> Any:
        daemon = yield Daemon(self, TURSO_AUTH_TOKEN="data-token", TURSO_ADMIN_TOKEN="admin-token").start()
        admin = bearer("admin-token")
        for _ in range(5):
            response = yield treq.post(daemon.data_url("/alpha/v2/pipeline"), SELECT_1,
                                       headers=bearer("data-token"))
            yield response.content()
        response = yield treq.get(daemon.data_url("/alpha/nowhere"), headers=bearer("data-token"))
        yield response.content()
        replica = yield self.replica(daemon, "beta", token="data-token")
        yield run_replica(replica.run, "create table t (x)", "insert into t values (1)")
        yield run_replica(replica.push)

        response = yield treq.get(daemon.admin_url("/metrics"))
        self.assertEqual(response.code, 401)
        yield response.content()
        response = yield treq.get(daemon.admin_url("/metrics"), headers=admin)
        text = (yield response.content()).decode()
        self.assertEqual(response.headers.getRawHeaders(b"content-type")[0].split(b";")[0], b"text/plain")
        self.assertEqual(metric(text, "turso_proxy_requests_total", kind="other", status_class="4xx"), 1)
        pipelines = metric(text, "turso_proxy_requests_total", kind="pipeline", status_class="2xx")
        self.assertGreaterEqual(pipelines, 7)
        self.assertGreaterEqual(metric(text, "turso_proxy_requests_total", kind="pull-updates",
                                       status_class="2xx"), 1)
        self.assertEqual(metric(text, "turso_namespaces", state="running"), 2)
        self.assertEqual(metric(text, "turso_namespaces_live"), 2)
        self.assertEqual(metric(text, "turso_child_spawns_total"), 2)
        self.assertEqual(metric(text, "turso_child_unexpected_exits_total"), 0)
        self.assertGreater(metric(text, "turso_state_writes_total"), 0)
        self.assertGreater(metric(text, "turso_proxy_request_duration_seconds_count", kind="pipeline"), 0)
        self.assertNotIn('namespace="', text, "no per-namespace labels")

        status, stats = yield get_json(daemon.admin_url("/v1/namespaces/alpha/stats"), headers=admin)
        self.assertEqual(status, 200)
        self.assertEqual(stats["requests"], 6)
        self.assertEqual(stats["bytesIn"], 5 * len(SELECT_1))
        self.assertGreater(stats["bytesOut"], 0)
        self.assertIn("alpha.db", stats["files"])
        self.assertEqual(stats["bytesOnDisk"], sum(stats["files"].values()))
        self.assertTrue(stats["running"])
        self.assertGreater(stats["rssBytes"], 1_000_000)
        self.assertGreaterEqual(stats["uptimeSeconds"], 0)

        lines = [e for e in daemon.logs() if e.get("logger") == "turso_twisted.access"]
        alpha = [e for e in lines if e["namespace"] == "alpha"]
        self.assertEqual(len(alpha), 6)
        first = alpha[0]
        self.assertEqual((first["msg"], first["method"], first["path"], first["status"]),
                         ("POST /alpha/v2/pipeline 200", "POST", "/alpha/v2/pipeline", 200))
        self.assertEqual(first["bytes_in"], len(SELECT_1))
        self.assertGreater(first["bytes_out"], 0)
        self.assertGreaterEqual(first["duration_ms"], first["upstream_ms"])
        self.assertEqual(alpha[-1]["status"], 404)
        log = open(daemon.log_path).read()
        self.assertNotIn("data-token", log)
        self.assertNotIn("admin-token", log)

    @inlineCallbacks
    def test_public_metrics_and_quiet_access_log(self) -> Any:
        daemon = yield Daemon(self, TURSO_ADMIN_TOKEN="admin-token", TURSO_METRICS_PUBLIC="true",
                              TURSO_ACCESS_LOG="false").start()
        response = yield treq.post(daemon.data_url("/alpha/v2/pipeline"), SELECT_1)
        yield response.content()
        response = yield treq.get(daemon.admin_url("/metrics"))
        self.assertEqual(response.code, 200)
        yield response.content()
        self.assertEqual([e for e in daemon.logs() if e.get("logger") == "turso_twisted.access"], [])
        status, _ = yield get_json(daemon.admin_url("/v1/namespaces"))
        self.assertEqual(status, 401, "public metrics open nothing else")
        json.dumps(status)


# The same cases with the data port served by two data workers.
    @inlineCallbacks
    def test_text_log_lines_for_a_person(self) -> Any:
        """TURSO_LOG_FORMAT=text: every line (the data workers' too) is text: time, level, namespace."""
        daemon = Daemon(self, TURSO_LOG_FORMAT="text")
        daemon.spawn()

        def lines() -> list[str]:
            with open(daemon.log_path, encoding="utf-8") as handle:
                return handle.read().splitlines()

        def served() -> int | None:
            found = [re.search(r" INFO  listening: data port on [\d.]+:(\d+)", line) for line in lines()]
            ready = any(" INFO  turso-server ready" in line for line in lines())
            return next((int(m.group(1)) for m in found if m), None) if ready else None

        port = yield wait_for(served, "the daemon to listen and be ready")
        response = yield treq.post(f"http://127.0.0.1:{port}/alpha/v2/pipeline", SELECT_1)
        self.assertEqual(response.code, 200)
        yield response.content()
        access = yield wait_for(lambda: [line for line in lines() if "POST /alpha/v2/pipeline 200" in line],
                                "the access log line")
        self.assertRegex(access[0], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO  \[alpha\] "
                                    r"POST /alpha/v2/pipeline 200 .*bytes_in=\d+ .*duration_ms=")
        for line in lines():
            self.assertFalse(line.startswith("{"), line)
            self.assertRegex(line, r"^(\d{4}-\d\d-\d\dT[\d:.]+Z (DEBUG|INFO |WARN |ERROR|CRITICAL) |    )")


globals().update(with_data_workers(ObservabilityTests))
