"""
A lean TCP client connection to a child on loopback.

The data port opens one connection to a child per request (tursodb closes
each one after its answer), so what a connection costs is paid per
request.  Twisted's C{connectTCP} is general: a connector, a connect
timeout, a writable wait for the handshake, then a switch to reading,
writes buffered until the next reactor turn.  On loopback the handshake
completes inside C{connect()}, so this connection registers for reading
once, writes at once, and is removed once: two C{epoll_ctl} calls where
Twisted makes five or six.

Failures keep their meaning for the channel: a connection on which not
one byte could be sent fails with L{ConnectionRefusedError} (the request
never reached the child, so it may be sent again), any later loss with
L{ConnectionLost}.
"""

from __future__ import annotations

import errno
import socket

from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IProtocol, IReactorFDSet, IReactorTime
from twisted.python.failure import Failure

#: How much one read takes from the socket.
READ_SIZE = 256 * 1024


class ConnectReactor(IReactorFDSet, IReactorTime):
    """What a loopback connection needs of the reactor."""


class LoopbackConnection:
    """
    One connection to C{127.0.0.1:port}: the transport of C{protocol},
    and its own reader and writer in the reactor.
    """

    disconnecting = False

    def __init__(self, reactor: ConnectReactor, port: int, protocol: IProtocol) -> None:
        self.reactor = reactor
        self.protocol = protocol
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setblocking(False)
        self._fd = self.socket.fileno()
        self._pending = bytearray()
        self._writing = False
        self._sent_any = False
        self._closed = False
        code = self.socket.connect_ex(("127.0.0.1", port))
        reactor.addReader(self)  # type: ignore[arg-type]  # provides IReadDescriptor
        protocol.makeConnection(self)  # type: ignore[arg-type]  # the transport it uses
        if code not in (0, errno.EINPROGRESS):
            self._fail_soon(OSError(code, errno.errorcode.get(code, "connect failed")))

    # -- the transport ---------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._closed or self.disconnecting:
            return
        if self._pending:
            self._pending += data
            return
        try:
            sent = self.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            self._fail_soon(error)
            return
        if sent:
            self._sent_any = True
        if sent < len(data):
            self._pending += data[sent:]
            self._start_writing()

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """Close once what is written is sent."""
        if self._closed:
            return
        self.disconnecting = True
        if not self._pending:
            self._close(None)

    def abortConnection(self) -> None:
        """Close now; what is not sent yet is dropped."""
        self._close(None)

    # -- the reactor's side ------------------------------------------------------------

    def fileno(self) -> int:
        return -1 if self._closed else self._fd

    def logPrefix(self) -> str:
        return "loopback"

    def doRead(self) -> None:
        try:
            data = self.socket.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError as error:
            self._close(error)
            return
        if not data:
            self._close(None if self.disconnecting or self._sent_any else ConnectionResetError())
            return
        self.protocol.dataReceived(data)

    def doWrite(self) -> None:
        try:
            sent = self.socket.send(self._pending)
        except BlockingIOError:
            return
        except OSError as error:
            self._close(error)
            return
        if sent:
            self._sent_any = True
            del self._pending[:sent]
        if not self._pending:
            self._stop_writing()
            if self.disconnecting:
                self._close(None)

    def connectionLost(self, reason: Failure) -> None:
        """The reactor dropped this connection (a hang-up, or the reactor stopping)."""
        self._close(reason.value if isinstance(reason.value, OSError) else OSError(str(reason.value)))

    # -- internals ---------------------------------------------------------------------

    def _start_writing(self) -> None:
        if not self._writing:
            self._writing = True
            self.reactor.addWriter(self)  # type: ignore[arg-type]  # provides IWriteDescriptor

    def _stop_writing(self) -> None:
        if self._writing:
            self._writing = False
            self.reactor.removeWriter(self)  # type: ignore[arg-type]

    def _fail_soon(self, error: OSError) -> None:
        # Never from inside the caller's write: the protocol learns of it on the next turn.
        self.reactor.callLater(0, self._close, error)

    def _close(self, error: BaseException | None) -> None:
        if self._closed:
            return
        self.reactor.removeReader(self)  # type: ignore[arg-type]
        self._stop_writing()
        self._closed = True
        self.socket.close()
        if error is None:
            reason = Failure(ConnectionDone())
        elif not self._sent_any:
            # Not one byte reached the child: safe to send elsewhere.
            reason = Failure(ConnectionRefusedError(str(error)))
        else:
            reason = Failure(ConnectionLost(str(error)))
        self.protocol.connectionLost(reason)


def connect_loopback(reactor: ConnectReactor, port: int, protocol: IProtocol) -> LoopbackConnection:
    """Connect C{protocol} to C{127.0.0.1:port}."""
    return LoopbackConnection(reactor, port, protocol)
