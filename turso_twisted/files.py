"""
File primitives every layer shares: atomic replacement, moves that never
replace, checksums and removal.

They block, and are meant for small files on the reactor thread (the state
file) or for any size in a thread (archives, backups).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from typing import ParamSpec, Protocol, TypeVar

from twisted.internet.defer import Deferred

_P = ParamSpec("_P")
_T = TypeVar("_T")


class RunInThread(Protocol):
    """
    How the primitives run off the reactor thread: L{deferToThread}, or a
    stand-in that tests pass.
    """

    def __call__(self, f: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> Deferred[_T]: ...


def fsync_directory(directory: str) -> None:
    """
    Make renames and unlinks in C{directory} durable.
    """
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str, payload: bytes, keep_previous: str | None = None) -> None:
    """
    Replace C{path} with C{payload} so that a crash leaves the old or the new
    content, never a mix.  With C{keep_previous}, the replaced file stays
    there under that name.
    """
    directory = os.path.dirname(path)
    temp = f"{path}.tmp-{os.getpid()}"
    with open(temp, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    if keep_previous is not None and os.path.exists(path):
        link = f"{keep_previous}.tmp-{os.getpid()}"
        if os.path.lexists(link):
            os.unlink(link)
        os.link(path, link)
        os.replace(link, keep_previous)
    os.replace(temp, path)
    fsync_directory(directory)


def move_no_clobber(source: str, target: str) -> None:
    """
    Move C{source} to C{target} on the same file system; fail with
    C{FileExistsError} rather than replace anything at C{target}.
    """
    os.link(source, target)
    os.unlink(source)


def sha256_and_size(path: str) -> tuple[str, int]:
    """
    The hex sha256 of a file and its size, read once.
    """
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def remove_paths(*paths: str) -> None:
    """
    Remove each path that exists: a directory with its content, or a file.
    """
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)


def remove_database_copy(path: str) -> None:
    """
    Remove a temp database copy and whatever SQLite or tursodb kept beside it.
    """
    remove_paths(path, path + "-wal", path + "-shm", path + "-journal")
