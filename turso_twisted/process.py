"""
One C{tursodb --sync-server} child: spawning it, routing its output to the
log, and knowing when it really serves.

A child is I{serving} when a listening socket on its port belongs to it (its
own file descriptors hold that socket's inode).  That is stronger than "the
port accepts connections": a foreign or orphaned process on the same port
would accept too, and routing a tenant to it is the kind of mistake this
daemon exists to rule out.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
from collections import deque
from collections.abc import Callable

from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IProcessTransport, IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

_BACKTRACE_FRAME = re.compile(r"^\s+(\d+:|at )|^stack backtrace:|^note: ")
_RUST_LOG_LINE = re.compile(r"^\S+Z\s+(ERROR|WARN|INFO|DEBUG|TRACE)\s+(.*)$")
_RUST_LEVELS = {
    "ERROR": LogLevel.error,
    "WARN": LogLevel.warn,
    "INFO": LogLevel.info,
    "DEBUG": LogLevel.debug,
    "TRACE": LogLevel.debug,
}


class TursodbProcess(ProcessProtocol):
    """
    The protocol of one child: logs each output line as
    C{tursodb.<name>} and tells whoever asks (L{whenEnded}) when the
    process is gone.
    """

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.port = port
        self.log = Logger(namespace=f"tursodb.{name}")
        self.recent_stderr: deque[str] = deque(maxlen=60)
        self.exit_code: int | None = None
        self.exit_signal: int | None = None
        self.has_ended = False
        self.pid: int | None = None
        self.transport: IProcessTransport | None = None
        self._partial = {1: b"", 2: b""}
        self._end_waiters: list[Deferred[TursodbProcess]] = []

    def whenEnded(self) -> Deferred[TursodbProcess]:
        """
        A new Deferred that fires with this protocol once the process has
        ended (at once if it has); each caller gets its own, so no caller's
        callbacks change what another sees, and cancelling it (a timeout)
        forgets it.
        """
        if self.has_ended:
            return succeed(self)
        waiter: Deferred[TursodbProcess] = Deferred(self._end_waiters.remove)
        self._end_waiters.append(waiter)
        return waiter

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._partial.get(childFD, b"") + data).split(b"\n")
        self._partial[childFD] = lines.pop()
        for line in lines:
            self._line(childFD, line)

    def _line(self, fd: int, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        if not line:
            return
        if fd == 2:
            self.recent_stderr.append(line)
        match = _RUST_LOG_LINE.match(line)
        if match:
            level, text = _RUST_LEVELS[match.group(1)], match.group(2)
        else:
            level, text = (LogLevel.warn if fd == 2 else LogLevel.info), line
        self.log.emit(level, "{log_text}", log_text=text, name=self.name)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in list(self._partial.items()):
            if rest:
                self._line(fd, rest)
        self._partial = {}
        value = reason.value
        if isinstance(value, (ierror.ProcessDone, ierror.ProcessTerminated)):
            self.exit_code = value.exitCode
            self.exit_signal = value.signal
        self.has_ended = True
        waiters, self._end_waiters = self._end_waiters, []
        for waiter in waiters:
            waiter.callback(self)

    def stderr_summary(self, lines: int = 6) -> list[str]:
        """
        The last stderr lines that say something: Rust backtrace frames
        (C{"  12: ..."}, C{"at src/..."}) are left out.
        """
        meaningful = [line for line in self.recent_stderr if not _BACKTRACE_FRAME.match(line)]
        return meaningful[-lines:]

    def exit_description(self) -> str:
        if self.exit_signal is not None:
            return f"killed by signal {self.exit_signal}"
        return f"exit status {self.exit_code}"

    def port_was_taken(self) -> bool:
        return any("Address already in use" in line for line in self.recent_stderr)

    def signal(self, name: str) -> None:
        """
        Send a signal if the process still runs; a race with its exit is fine.
        """
        if self.has_ended or self.transport is None:
            return
        try:
            self.transport.signalProcess(name)
        except ierror.ProcessExitedAlready:
            pass


def child_environment(environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """
    What a child inherits: enough to run, never our tokens or settings.
    """
    env = {"PATH": environ.get("PATH", "/usr/bin:/bin")}
    for key in ("RUST_LOG", "RUST_BACKTRACE", "LANG", "TZ"):
        if key in environ:
            env[key] = environ[key]
    return env


def spawn_tursodb(
    reactor: IReactorProcess,
    tursodb_bin: str,
    db_path: str,
    port: int,
    name: str,
    wrappers: list[str],
    env: dict[str, str],
    cwd: str | None,
) -> TursodbProcess:
    """
    Start C{tursodb <db> --sync-server 127.0.0.1:<port>} in C{cwd} (C{None}:
    the wrappers enter it), through the C{wrappers} (see L{child_wrappers}),
    which all exec: the pid is tursodb's.
    """
    protocol = TursodbProcess(name, port)
    args = [*wrappers, tursodb_bin, db_path, "--sync-server", f"127.0.0.1:{port}"]
    reactor.spawnProcess(
        protocol,
        args[0],
        args,
        env=env,
        path=cwd,
        childFDs={0: "w", 1: "r", 2: "r"},
    )
    return protocol


def child_wrappers(which: Callable[[str], str | None] = shutil.which) -> list[str]:
    """
    The util-linux commands a child is started through, where present:

      - C{setsid}: its own session, so a Ctrl-C or a signal to the daemon's
        process group reaches the daemon alone, which then stops children
        in order;
      - C{setpriv --pdeathsig KILL}: if the daemon is killed outright, the
        kernel kills its children, so no orphan keeps a file lock or port.
    """
    wrappers: list[str] = []
    setsid = which("setsid")
    if setsid:
        wrappers.append(setsid)
    setpriv = which("setpriv")
    if setpriv:
        wrappers += [setpriv, "--pdeathsig", "KILL", "--"]
    return wrappers


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_LISTEN = 10


def _listening_inodes_netlink(port: int) -> set[int]:
    """
    Inodes of TCP sockets listening on C{port}, asked of the kernel over
    sock_diag netlink with a LISTEN-only state filter: the kernel walks
    only its listening table, so the cost does not grow with the number of
    connections (reading /proc/net/tcp does, and took ~12 ms here).
    """
    inodes: set[int] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as link:
        for sequence, family in enumerate((socket.AF_INET, socket.AF_INET6), 1):
            # struct inet_diag_req_v2, then struct inet_diag_sockid (any address, no cookie)
            sockid = struct.pack("!HH16s16s", 0, 0, bytes(16), bytes(16))
            sockid += struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)
            request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 1 << _TCP_LISTEN) + sockid
            header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY,
                                 _NLM_F_REQUEST | _NLM_F_DUMP, sequence, 0)
            link.send(header + request)
            done = False
            while not done:
                data = link.recv(65536)
                offset = 0
                while offset + 16 <= len(data):
                    length, kind = struct.unpack_from("=IH", data, offset)
                    if kind == _NLMSG_DONE:
                        done = True
                        break
                    if kind == _NLMSG_ERROR:
                        raise OSError("sock_diag request refused")
                    # struct inet_diag_msg: 4 bytes, sockid (48), 4 x u32, then the inode
                    body = offset + 16
                    if struct.unpack_from("!H", data, body + 4)[0] == port:
                        inodes.add(struct.unpack_from("=I", data, body + 68)[0])
                    offset += (length + 3) & ~3
                if not data:
                    break
    return inodes


def _listening_inodes_proc(port: int) -> set[int]:
    """
    The same from /proc/net/tcp{,6}: slower, for kernels without sock_diag.
    """
    wanted = f":{port:04X}"
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                next(handle, None)
                for line in handle:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == "0A" and fields[1].endswith(wanted):
                        inodes.add(int(fields[9]))
        except OSError:
            continue
    return inodes


def _listening_inodes(port: int) -> set[int]:
    try:
        return _listening_inodes_netlink(port)
    except OSError:
        return _listening_inodes_proc(port)


def owns_listener(pid: int, port: int) -> bool:
    """
    Whether process C{pid} holds a socket listening on C{port}.
    """
    inodes = _listening_inodes(port)
    if not inodes:
        return False
    fd_dir = f"/proc/{pid}/fd"
    try:
        entries = os.listdir(fd_dir)
    except OSError:
        return False
    for entry in entries:
        try:
            target = os.readlink(os.path.join(fd_dir, entry))
        except OSError:
            continue
        if target.startswith("socket:[") and int(target[8:-1]) in inodes:
            return True
    return False
