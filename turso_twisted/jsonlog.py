"""
Structured logs: one JSON object per line on stdout.

Keys follow the design note's examples: C{time}, C{level}, C{msg}, then the
event's own fields (C{name}, C{port}, ...).  C{logger} names the source, e.g.
C{tursodb.alpha} for a child's output.  twistd loads L{observer_factory}
through its C{--logger} option, which the plugin sets by default.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent
from zope.interface import directlyProvides

_LEVELS = {
    LogLevel.debug: "DEBUG",
    LogLevel.info: "INFO",
    LogLevel.warn: "WARN",
    LogLevel.error: "ERROR",
    LogLevel.critical: "CRITICAL",
}

#: Twisted's own port announcements; we log "listening" ourselves.
_PORT_CHATTER = re.compile(r"^(\S+ starting on \d+|\(\S+ Port \d+ Closed\)|(Starting|Stopping) factory .*)$")

#: Namespaces whose chatter says nothing an operator needs.
_QUIET_NAMESPACES = ("twisted.web.client", "twisted.internet.protocol", "twisted.web._newclient")


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    return str(value)


def event_as_json(event: LogEvent) -> str | None:
    """
    Render one event as a JSON line, or C{None} for events we drop.
    """
    namespace = event.get("log_namespace", "")
    level = event.get("log_level", LogLevel.info)
    if namespace.startswith(_QUIET_NAMESPACES) and level < LogLevel.warn:
        return None
    if event.get("log_system") == "-" and event.get("log_format") is None and not event.get("message"):
        return None
    text = formatEvent(event).strip()
    if namespace == "log_legacy" and _PORT_CHATTER.match(text):
        return None
    moment = datetime.fromtimestamp(event.get("log_time", 0), tz=timezone.utc)
    record: dict[str, Any] = {
        "time": moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z",
        "level": _LEVELS.get(level, "INFO"),
        "msg": text,
        "logger": namespace,
    }
    for key, value in event.items():
        if key.startswith("log_") or key in ("message", "format", "isError", "system", "time",
                                             "why", "failure", "printed"):
            continue
        record.setdefault(key, _plain(value))
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = f"{failure.type.__name__}: {failure.getErrorMessage()}"
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False)


def json_observer(stream: IO[str]) -> Callable[[LogEvent], None]:
    def observe(event: LogEvent) -> None:
        line = event_as_json(event)
        if line is not None:
            stream.write(line + "\n")
            stream.flush()

    # As @provider(ILogObserver) would, but mypy keeps the function's type.
    directlyProvides(observe, ILogObserver)
    return observe


def observer_factory() -> Callable[[LogEvent], None]:
    """
    What twistd calls to make its observer; stdout is captured now, before
    twistd redirects standard I/O into the log.
    """
    return json_observer(sys.stdout)
