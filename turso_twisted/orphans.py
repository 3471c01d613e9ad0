"""
Children left behind by an earlier daemon that was killed outright.

Children are started with a parent-death signal, so the kernel normally
kills them with the daemon.  This sweep is the second line: at start-up,
any C{tursodb --sync-server} whose database lies in our data dir is killed
before we spawn anything, so no stray process keeps a file lock or a port.
"""

from __future__ import annotations

import os
import signal
import time

from twisted.logger import Logger

_log = Logger()


def _cmdline(pid: str) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            raw = handle.read()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def find_orphans(data_dir: str, binary: str = "tursodb", own_pid: int | None = None) -> list[int]:
    """
    PIDs of C{tursodb --sync-server} processes (by that name or C{binary}'s)
    serving a file in C{data_dir}.
    """
    data_dir = os.path.abspath(data_dir)
    programs = {"tursodb", os.path.basename(binary)}
    own_pid = os.getpid() if own_pid is None else own_pid
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit() or int(entry) == own_pid:
            continue
        argv = _cmdline(entry)
        if "--sync-server" not in argv:
            continue
        if not any(os.path.basename(arg) in programs for arg in argv[:5]):
            continue
        if any(os.path.dirname(arg) == data_dir and arg.endswith(".db") for arg in argv):
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_orphans(data_dir: str, binary: str = "tursodb", wait: float = 5.0) -> list[int]:
    """
    SIGKILL every orphan of C{data_dir} and wait (bounded) until they are
    gone.  Runs once at start-up, before the reactor serves anything.
    """
    pids = find_orphans(data_dir, binary)
    for pid in pids:
        _log.warn("killing orphaned tursodb from an earlier run", pid=pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    return pids
