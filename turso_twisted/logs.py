"""
Log lines on stdout: one JSON object per event (C{TURSO_LOG_FORMAT=json},
the default, for log pipelines), or one line of text per event (C{text},
for a person reading along).

JSON keys follow the design note's examples: C{time}, C{level}, C{msg},
then the event's own fields (C{name}, C{port}, ...).  C{logger} names the
source, e.g. C{tursodb.alpha} for a child's output.  A text line has the
time, the level, the namespace, the message, and the fields the message
does not show as C{key=value}.  twistd loads L{observer_factory} through
its C{--logger} option, which the plugin sets by default.
"""

from __future__ import annotations

import json
import os
import re
import select
import sys
import time
import weakref
from collections.abc import Callable
from string import Formatter
from typing import IO, Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent
from twisted.python.threadable import isInIOThread
from zope.interface import directlyProvides

_LEVELS = {
    LogLevel.debug: "DEBUG",
    LogLevel.info: "INFO",
    LogLevel.warn: "WARN",
    LogLevel.error: "ERROR",
    LogLevel.critical: "CRITICAL",
}

#: Twisted's own port announcements; we log "listening" ourselves.
_PORT_CHATTER = re.compile(
    r"^(.+ starting on (\d+|'.*')|\((TCP|UNIX) Port .+ Closed\)|(Starting|Stopping) factory .*)$", re.DOTALL)

#: Namespaces whose chatter says nothing an operator needs.
_QUIET_NAMESPACES = ("twisted.web.client", "twisted.internet.protocol", "twisted.web._newclient",
                     "twisted.protocols.amp")


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    return str(value)


def _message(event: LogEvent) -> str:
    """
    The event's message: a plain format filled in by C{str.format_map}
    (most of ours, and the access log's, once per request), else by
    Twisted's own formatter (which also calls methods in fields).
    """
    fmt = event.get("log_format")
    if fmt is not None and "(" not in fmt:
        try:
            return str(fmt.format_map(event)).strip()
        except (KeyError, IndexError, AttributeError, ValueError):
            pass
    return formatEvent(event).strip()


class _Stamp:
    """ISO 8601 UTC time with milliseconds; the part to the second is made once a second."""

    second = -1
    prefix = ""

    def __call__(self, moment: float) -> str:
        whole = int(moment)
        if whole != self.second:
            self.second, self.prefix = whole, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(whole))
        return f"{self.prefix}{int((moment - whole) * 1000):03d}Z"


_stamp = _Stamp()


def _shown(event: LogEvent) -> str | None:
    """The event's message, or C{None} for events we drop."""
    namespace = event.get("log_namespace", "")
    level = event.get("log_level", LogLevel.info)
    if namespace.startswith(_QUIET_NAMESPACES) and level < LogLevel.warn:
        return None
    if event.get("log_system") == "-" and event.get("log_format") is None and not event.get("message"):
        return None
    text = _message(event)
    if namespace == "log_legacy" and _PORT_CHATTER.match(text):
        return None
    return text


def _fields(event: LogEvent) -> dict[str, Any]:
    """The event's own fields."""
    return {key: value for key, value in event.items()
            if not key.startswith("log_") and key not in _NOT_FIELDS}


_NOT_FIELDS = frozenset({"message", "format", "isError", "system", "time", "why", "failure", "printed"})


def event_as_json(event: LogEvent) -> str | None:
    """
    Render one event as a JSON line, or C{None} for events we drop.
    """
    text = _shown(event)
    if text is None:
        return None
    namespace = event.get("log_namespace", "")
    level = event.get("log_level", LogLevel.info)
    record: dict[str, Any] = {
        "time": _stamp(event.get("log_time", 0)),
        "level": _LEVELS.get(level, "INFO"),
        "msg": text,
        "logger": namespace,
    }
    for key, value in _fields(event).items():
        record.setdefault(key, _plain(value))
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = f"{failure.type.__name__}: {failure.getErrorMessage()}"
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False)


def _in_format(fmt: str | None) -> frozenset[str]:
    """The fields a format string shows."""
    if not fmt:
        return frozenset()
    try:
        return frozenset(field.split(".")[0].split("[")[0]
                         for _, field, _, _ in Formatter().parse(fmt) if field)
    except ValueError:
        return frozenset()


def _text_value(value: Any) -> str:
    plain = _plain(value)
    if isinstance(plain, str) and plain and not any(c.isspace() or c in "\"=" for c in plain):
        return plain
    return json.dumps(plain, ensure_ascii=False)


def event_as_text(event: LogEvent) -> str | None:
    """
    Render one event as a line of text, or C{None} for events we drop:
    time, level, C{[namespace]}, the message, then the fields it does not
    show; a failure adds its error, and its traceback on indented lines.
    """
    text = _shown(event)
    if text is None:
        return None
    level = _LEVELS.get(event.get("log_level", LogLevel.info), "INFO")
    fields = _fields(event)
    namespace = fields.pop("name", None) or fields.pop("namespace", None)
    shown = _in_format(event.get("log_format"))
    parts = [_stamp(event.get("log_time", 0)), f"{level:<5}"]
    if isinstance(namespace, str) and namespace:
        parts.append(f"[{namespace}]")
    parts.append(" ".join(text.splitlines()) if "\n" in text else text)
    parts += [f"{key}={_text_value(value)}" for key, value in fields.items() if key not in shown]
    line = " ".join(parts)
    failure = event.get("log_failure")
    if failure is not None:
        line += f" error={_text_value(f'{failure.type.__name__}: {failure.getErrorMessage()}')}"
        line += "".join("\n    " + row for row in failure.getTraceback().rstrip().splitlines())
    return line


#: How each log format renders an event.
FORMATS: dict[str, Callable[[LogEvent], str | None]] = {"json": event_as_json, "text": event_as_text}


class _Format:
    """The format every observer writes in: from C{TURSO_LOG_FORMAT} at first, then the daemon's config."""

    def __init__(self) -> None:
        self.render: Callable[[LogEvent], str | None] = event_as_json

    def use(self, name: str) -> None:
        self.render = FORMATS[name]


_format = _Format()


def use_format(name: str) -> None:
    """Write every event from now on as C{name} (C{json} or C{text})."""
    _format.use(name)


class _TextSink:
    """Lines to a text stream (a test's C{StringIO}, say)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, line: str) -> None:
        self.stream.write(line)

    def flush(self) -> None:
        self.stream.flush()


class _DescriptorSink:
    """
    Lines to a file descriptor, each C{write()} whole lines of at most
    C{PIPE_BUF} bytes: data workers share the main process's stdout, and a
    pipe keeps such writes whole, so lines from different processes never
    mix (a longer line goes in one write of its own).
    """

    def __init__(self, stream: IO[str]) -> None:
        stream.flush()
        self.fd = stream.fileno()
        self.lines: list[bytes] = []

    def write(self, line: str) -> None:
        self.lines.append(line.encode("utf-8", "replace"))

    def flush(self) -> None:
        lines, self.lines = self.lines, []
        chunk: list[bytes] = []
        size = 0
        for line in lines:
            if chunk and size + len(line) > select.PIPE_BUF:
                self._write(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            self._write(b"".join(chunk))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except InterruptedError:
                continue
            except OSError:
                return  # stdout is gone: nothing to tell it


def _sink(stream: IO[str]) -> _TextSink | _DescriptorSink:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return _TextSink(stream)
    return _DescriptorSink(stream)


class _Flushing:
    """
    When lines are flushed: each at once, until L{flush_with} gives a
    clock; then lines below WARN written in one turn of the reactor go out
    together at the end of it (one write for many access-log lines), and
    WARN and above, and lines from other threads, at once.
    """

    clock: IReactorTime | None = None
    sinks: weakref.WeakSet[_TextSink | _DescriptorSink] = weakref.WeakSet()
    pending = False

    def soon(self) -> None:
        if not self.pending and self.clock is not None:
            self.pending = True
            self.clock.callLater(0, self.now)

    def now(self) -> None:
        self.pending = False
        for sink in list(self.sinks):
            try:
                sink.flush()
            except ValueError:
                pass  # closed


_flushing = _Flushing()


def flush_with(clock: IReactorTime | None) -> None:
    """Batch flushes on C{clock}'s turns; C{None}: flush each line again (and flush now)."""
    _flushing.clock = clock
    _flushing.now()


def log_observer(stream: IO[str], fields: dict[str, Any] | None = None) -> Callable[[LogEvent], None]:
    """
    An observer writing each event as a line to C{stream} in the log
    format in use, with C{fields} added to every line (a data worker's
    number, say).
    """
    sink = _sink(stream)
    _flushing.sinks.add(sink)
    extra = dict(fields or {})

    def observe(event: LogEvent) -> None:
        line = _format.render({**event, **extra} if extra else event)
        if line is None:
            return
        sink.write(line + "\n")
        if (_flushing.clock is None or event.get("log_level", LogLevel.info) >= LogLevel.warn
                or not isInIOThread()):
            sink.flush()
        else:
            _flushing.soon()

    # The sink lives as long as the observer does.
    observe.sink = sink  # type: ignore[attr-defined]
    # As @provider(ILogObserver) would, but mypy keeps the function's type.
    directlyProvides(observe, ILogObserver)
    return observe


def observer_factory() -> Callable[[LogEvent], None]:
    """
    What twistd calls to make its observer; stdout is captured now, before
    twistd redirects standard I/O into the log.
    """
    requested = os.environ.get("TURSO_LOG_FORMAT", "json").strip().lower()
    if requested in FORMATS:
        # The config checks the value (and an option beats it) once it is loaded.
        use_format(requested)
    return log_observer(sys.stdout)
