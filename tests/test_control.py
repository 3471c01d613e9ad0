"""
The control channel's arguments and the figures workers report: values
larger than one AMP value, and counters that add up across processes.
"""

from __future__ import annotations

from typing import Any

from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase

from turso_twisted import control
from turso_twisted.metrics import LATENCY_BUCKETS, DataFigures, request_families


def round_trip(command: type[amp.Command], **arguments: Any) -> dict[str, Any]:
    """C{arguments} through an AMP box and back, as the other side reads them."""
    box = command.makeArguments(arguments, None)
    wire = amp.AmpBox(box).serialize()
    [parsed] = amp.parseString(wire)
    return dict(command.parseArguments(parsed, None))


class ArgumentTests(SynchronousTestCase):
    def test_json_larger_than_one_amp_value(self) -> None:
        record = {"clients": [f"replica-{i:06d}" for i in range(20_000)], "history": "abc"}
        self.assertGreater(len(str(record)), 0xFFFF)
        parsed = round_trip(control.Refresh, name="alpha", record=record)
        self.assertEqual(parsed, {"name": "alpha", "record": record})

    def test_bytes_larger_than_one_amp_value(self) -> None:
        head = b"POST /alpha/v2/pipeline HTTP/1.1\r\n" + bytes(range(256)) * 1000
        strings: dict[bytes, bytes] = {}
        control.BigBytes().toBox(b"head", strings, {"head": head}, None)
        [parsed_box] = amp.parseString(amp.AmpBox(strings).serialize())
        parsed: dict[str, Any] = {}
        control.BigBytes().fromBox(b"head", parsed_box, parsed, None)
        self.assertEqual(parsed["head"], head)


class DataFiguresTests(SynchronousTestCase):
    def test_figures_add_up_across_processes(self) -> None:
        first, second = DataFigures(), DataFigures()
        first.observe("pipeline", 200, 0.0007, 10, 20)
        second.observe("pipeline", 200, 0.0007, 1, 2)
        second.observe("pull-updates", 503, 40.0, 0, 5)
        second.auth_refused["expired"] = 3
        second.held_bytes = 7
        total = DataFigures()
        for figures in (first, DataFigures.from_json(second.to_json())):
            total.add(figures)
        self.assertEqual(total.requests, {"pipeline 2xx": 2, "pull-updates 5xx": 1})
        self.assertEqual((total.bytes_in, total.bytes_out, total.held_bytes), (11, 27, 7))
        self.assertEqual(total.auth_refused, {"expired": 3})
        # 0.7 ms falls in the 1 ms bucket; 40 s past the last one.
        self.assertEqual(total.latency["pipeline"][LATENCY_BUCKETS.index(0.001)], 2)
        self.assertEqual(total.latency["pull-updates"][-1], 1)

    def test_histogram_is_cumulative_in_prometheus(self) -> None:
        figures = DataFigures()
        for seconds in (0.0004, 0.002, 0.002, 3.0):
            figures.observe("pipeline", 200, seconds, 0, 0)
        [_, latency, *_] = list(request_families(figures))
        samples = {(s.name, s.labels.get("le")): s.value for s in latency.samples}
        self.assertEqual(samples[("turso_proxy_request_duration_seconds_bucket", "0.0005")], 1)
        self.assertEqual(samples[("turso_proxy_request_duration_seconds_bucket", "0.0025")], 3)
        self.assertEqual(samples[("turso_proxy_request_duration_seconds_bucket", "+Inf")], 4)
        self.assertEqual(samples[("turso_proxy_request_duration_seconds_count", None)], 4)
        self.assertIn(b'turso_proxy_request_duration_seconds_count{kind="pipeline"} 4.0',
                      _render(figures))


def _render(figures: DataFigures) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest

    class Collector:
        def collect(self) -> Any:
            return request_families(figures)

    registry = CollectorRegistry()
    registry.register(Collector())  # type: ignore[arg-type]
    return generate_latest(registry)
