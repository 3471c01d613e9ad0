"""
Times as the state file, the API, the logs and the settings write them:
RFC 3339 timestamps (UTC, ms), compact timestamps for file names, and
Go-style durations.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone


def to_rfc3339(seconds: float) -> str:
    moment = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def from_rfc3339(text: str) -> float:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"timestamp without a zone: {text!r}")
    return moment.timestamp()


def compact(seconds: float) -> str:
    """
    A timestamp safe in a file name and sortable: C{20261121T214513.376Z}.
    """
    moment = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return moment.strftime("%Y%m%dT%H%M%S.") + f"{moment.microsecond // 1000:03d}Z"


#: Longer durations are refused: they would only overflow timestamps.
MAX_DURATION = 100 * 365 * 86400.0

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h|d)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}


def parse_duration(text: str) -> float:
    """
    Parse a Go-style duration (C{"5s"}, C{"1h30m"}, C{"168h0m0s"}) or a
    number of days (C{"7d"}) into seconds.  C{"0"} alone means zero.
    """
    text = text.strip()
    if text == "0":
        return 0.0
    if not text:
        raise ValueError("empty duration")
    position = 0
    total = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position != len(text):
        raise ValueError(f"not a duration: {text!r} (use e.g. 5s, 1h30m, 7d)")
    if total > MAX_DURATION:
        raise ValueError(f"duration {text!r} is longer than 100 years")
    return total


def format_duration(seconds: float) -> str:
    """
    Render seconds the way Go does (C{"1h0m0s"}, C{"1.5s"}, C{"0s"}), in a
    form L{parse_duration} reads back (never an exponent).
    """
    if seconds < 1:
        millis = seconds * 1000
        return f"{_decimal(millis)}ms" if millis else "0s"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    out = ""
    if hours:
        out += f"{int(hours)}h"
    if hours or minutes:
        out += f"{int(minutes)}m"
    return out + f"{_decimal(secs)}s"


def _decimal(value: float) -> str:
    return f"{value:.9f}".rstrip("0").rstrip(".") or "0"
