"""
The internal port range children listen on.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

import attrs


class PortsExhausted(Exception):
    """
    Every port of the range is taken, by our children or by others.
    """


def can_bind(port: int) -> bool:
    """
    Whether 127.0.0.1:C{port} is free right now (as tursodb binds it).
    """
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
    except OSError as error:
        if error.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            return False
        raise
    finally:
        probe.close()
    return True


@attrs.define
class PortAllocator:
    """
    Hands out ports of C{[start, end]}, each to one child at a time.

    Ports are handed out round-robin so that a port just given back (whose
    old listener may linger) is the last to be reused; a port some other
    process holds is skipped.
    """

    start: int
    end: int
    is_free: Callable[[int], bool] = can_bind
    in_use: set[int] = attrs.field(factory=set)
    _cursor: int = attrs.field(default=-1, init=False)

    def acquire(self) -> int:
        size = self.end - self.start + 1
        for _ in range(size):
            self._cursor = (self._cursor + 1) % size
            port = self.start + self._cursor
            if port not in self.in_use and self.is_free(port):
                self.in_use.add(port)
                return port
        raise PortsExhausted(
            f"no free port in TURSO_BACKEND_PORT_START..END ({self.start}-{self.end}): "
            f"{len(self.in_use)} used by namespaces, the rest by other processes"
        )

    def release(self, port: int) -> None:
        self.in_use.discard(port)
