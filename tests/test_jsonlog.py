"""
Structured log lines.
"""

from __future__ import annotations

import io
import json

from twisted.logger import Logger, LogLevel
from twisted.trial.unittest import SynchronousTestCase

from turso_twisted.jsonlog import event_as_json, json_observer
from turso_twisted.process import TursodbProcess


class JsonLogTests(SynchronousTestCase):
    def emit(self, logger: Logger, level: LogLevel, fmt: str, **fields: object) -> dict[str, object]:
        stream = io.StringIO()
        logger.observer = json_observer(stream)
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
        child.log.observer = json_observer(stream)
        child.childDataReceived(2, b"2026-11-21T21:45:13.376999Z ERROR ThreadId(01) x: boom {}\n")
        child.childDataReceived(1, b"plain line\n")
        first, second = (json.loads(line) for line in stream.getvalue().splitlines())
        self.assertEqual((first["logger"], first["level"], first["name"]),
                         ("tursodb.alpha", "ERROR", "alpha"))
        self.assertEqual(first["msg"], "ThreadId(01) x: boom {}")
        self.assertEqual((second["level"], second["msg"]), ("INFO", "plain line"))

    def test_failures_carry_the_error(self) -> None:
        stream = io.StringIO()
        log = Logger(observer=json_observer(stream))
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
