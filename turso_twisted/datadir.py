"""
The data dir as a whole: one daemon at a time, and its scratch space.

A daemon holds an exclusive C{flock} on C{_state/daemon.lock} for its whole
life.  A second daemon on the same dir stops at start-up instead of
"cleaning up" the first one's children; the kernel drops the lock when the
holder dies, however it dies, so a crash never leaves the dir locked.

C{_tmp/} holds scratch files (backups being written, databases being
built, children's own temp dirs).  Nothing in it outlives a run: start-up
recovery empties it (see L{turso_twisted.recovery}).
"""

from __future__ import annotations

import fcntl
import os

LOCK_NAME = "daemon.lock"


class DataDirBusy(Exception):
    """
    Another live daemon holds the data dir.
    """


def lock_data_dir(data_dir: str) -> int:
    """
    Take the data dir for this process; return the lock's descriptor, which
    must stay open.

    @raise DataDirBusy: naming the holder's pid.
    """
    state_dir = os.path.join(data_dir, "_state")
    os.makedirs(state_dir, exist_ok=True)
    path = os.path.join(state_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise DataDirBusy(
            f"TURSO_DATA_DIR={data_dir!r}: another turso-server (pid {holder}) is using it"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def temp_dir(data_dir: str) -> str:
    return os.path.join(data_dir, "_tmp")
