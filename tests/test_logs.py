"""
Structured log lines.
"""

from __future__ import annotations

import io
import json

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from turso_twisted import logs
from turso_twisted.logs import event_as_json, event_as_text, flush_with, log_observer, use_format
from turso_twisted.process import TursodbProcess


class JsonLogTests(SynchronousTestCase):
    def emit(self, logger: Logger, level: LogLevel, fmt: str, **fields: object) -> dict[str, object]:
        stream = io.StringIO()
        logger.observer = log_observer(stream)
        logger.emit(level, fmt, **fields)
        return json.loads(stream.getvalue())

    def test_note_shaped_line(self) -> None:
        line = self.emit(Logger(namespace="turso_twisted.supervisor"), LogLevel.info,
                         "namespace running", name="api-keys", port=9000, pid=12, origin="auto")
        self.assertEqual(line["level"], "INFO")
        self.assertEqual(line["msg"], "namespace running")
        self.assertEqual((line["name"], line["port"], line["pid"], line["origin"]),
                         ("api-keys", 9000, 12, "auto"))
        self.assertRegex(line["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

    def test_warn_level_name(self) -> None:
        line = self.emit(Logger(), LogLevel.warn, "upstream error", path="/a/b", err="refused")
        self.assertEqual(line["level"], "WARN")

    def test_odd_values_are_stringified(self) -> None:
        line = self.emit(Logger(), LogLevel.info, "x {thing}", thing=object(), items=(1, 2))
        self.assertTrue(line["msg"].startswith("x <object"))
        self.assertEqual(line["items"], [1, 2])

    def test_child_lines_are_tagged(self) -> None:
        stream = io.StringIO()
        child = TursodbProcess("alpha", 9000)
        child.log.observer = log_observer(stream)
        child.childDataReceived(2, b"2026-11-21T21:45:13.376999Z ERROR ThreadId(01) x: boom {}\n")
        child.childDataReceived(1, b"plain line\n")
        first, second = (json.loads(line) for line in stream.getvalue().splitlines())
        self.assertEqual((first["logger"], first["level"], first["name"]),
                         ("tursodb.alpha", "ERROR", "alpha"))
        self.assertEqual(first["msg"], "ThreadId(01) x: boom {}")
        self.assertEqual((second["level"], second["msg"]), ("INFO", "plain line"))

    def test_failures_carry_the_error(self) -> None:
        stream = io.StringIO()
        log = Logger(observer=log_observer(stream))
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("it broke")
        line = json.loads(stream.getvalue())
        self.assertEqual(line["level"], "CRITICAL")
        self.assertIn("ZeroDivisionError", line["error"])

    def test_quiet_namespaces_dropped(self) -> None:
        self.assertIsNone(event_as_json({"log_namespace": "twisted.web.client._HTTP11ClientFactory",
                                         "log_level": LogLevel.info, "log_format": "Starting",
                                         "log_time": 0}))

    def test_messages_match_twisteds_formatter(self) -> None:
        for fmt, fields in (("{a} {b!r} {c:>4}", {"a": 1, "b": "x", "c": 7}),
                            ("{obj.real}", {"obj": 3}), ("{missing}", {}), ("{f()}", {"f": lambda: "called"}),
                            ("{0}", {}), ("{{literal}}", {})):
            event = {"log_format": fmt, "log_level": LogLevel.info, "log_time": 0.5, **fields}
            self.assertEqual(json.loads(event_as_json(event) or "")["msg"], formatEvent(event).strip(), fmt)

    def test_time_to_the_millisecond(self) -> None:
        line = json.loads(event_as_json({"log_format": "x", "log_level": LogLevel.info,
                                         "log_time": 1795912345.6789}) or "")
        self.assertEqual(line["time"], "2026-11-29T00:32:25.678Z")


class TextLogTests(SynchronousTestCase):
    """TURSO_LOG_FORMAT=text: one line per event for a person."""

    def line(self, fmt: str, level: LogLevel = LogLevel.info, **fields: object) -> str:
        return event_as_text({"log_format": fmt, "log_level": level, "log_time": 1795912345.6789,
                              "log_namespace": "turso_twisted.x", **fields}) or ""

    def test_time_level_namespace_message_and_the_fields_it_does_not_show(self) -> None:
        self.assertEqual(self.line("namespace {name} running on port {port}", name="alpha", port=9000,
                                   pid=12, reason="two words"),
                         '2026-11-29T00:32:25.678Z INFO  [alpha] namespace alpha running on port 9000 '
                         'pid=12 reason="two words"')
        self.assertEqual(self.line("{method} {path} {status}", LogLevel.warn, namespace="beta",
                                   method="GET", path="/beta/x", status=502, nested={"a": [1]}),
                         '2026-11-29T00:32:25.678Z WARN  [beta] GET /beta/x 502 nested={"a": [1]}')

    def test_a_failure_adds_its_error_and_an_indented_traceback(self) -> None:
        stream = io.StringIO()
        log = Logger(observer=log_observer(stream))
        self.addCleanup(use_format, "json")
        use_format("text")
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("it broke")
        first, *rest = stream.getvalue().splitlines()
        self.assertRegex(first, r"^\S+Z CRITICAL it broke error=\"ZeroDivisionError: division by zero\"$")
        self.assertTrue(rest and all(line.startswith("    ") for line in rest), rest)

    def test_dropped_events_stay_dropped(self) -> None:
        self.assertIsNone(event_as_text({"log_namespace": "twisted.web.client._HTTP11ClientFactory",
                                         "log_level": LogLevel.info, "log_format": "Starting",
                                         "log_time": 0}))


class _CountingStream(io.StringIO):
    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


class FlushTests(SynchronousTestCase):
    """
    Once the service gives a clock, lines below WARN are flushed together at
    the end of the reactor's turn; WARN and above at once.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.addCleanup(flush_with, None)
        self.patch(logs, "isInIOThread", lambda: True)

    def test_one_flush_per_turn(self) -> None:
        stream = _CountingStream()
        log = Logger(observer=log_observer(stream))
        log.info("first")
        self.assertEqual(stream.flushes, 1)  # no clock yet: at once
        flush_with(self.clock)
        before = stream.flushes
        for n in range(5):
            log.info("line {n}", n=n)
        self.assertEqual(stream.flushes, before)
        self.clock.advance(0)
        self.assertEqual(stream.flushes, before + 1)
        log.warn("trouble")
        self.assertEqual(stream.flushes, before + 2)
        self.assertEqual(len(stream.getvalue().splitlines()), 7)
