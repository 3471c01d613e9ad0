"""
The archive bin: C{<data dir>/archive/<name>.<timestamp>/}.

Archiving moves a stopped namespace's files (never copies, never deletes)
into a new entry with a C{manifest.json} naming the namespace, its id and
each file's size and sha256.  The entry is assembled in a hidden staging
directory and renamed into place only when complete, so a crash leaves
either the live files or a complete entry; L{recover} finishes or undoes
what a crash interrupted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from . import names
from .state import NamespaceRecord, fsync_directory, write_atomically
from .timefmt import compact, to_rfc3339

MANIFEST = "manifest.json"
_STAGING_PREFIX = ".staging-"

_log = Logger()


def move_no_clobber(source: str, target: str) -> None:
    """
    Move C{source} to C{target} on the same file system; fail with
    C{FileExistsError} rather than replace anything at C{target}.
    """
    os.link(source, target)
    os.unlink(source)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _archive_files(data_dir: str, archive_dir: str, record: NamespaceRecord,
                   reason: str, now: float) -> dict[str, Any]:
    """
    The blocking part of L{Archiver.archive}; runs in a thread.
    """
    os.makedirs(archive_dir, exist_ok=True)
    entry_name = f"{record.name}.{compact(now)}"
    suffix = 0
    while os.path.lexists(os.path.join(archive_dir, entry_name)):
        suffix += 1
        entry_name = f"{record.name}.{compact(now)}-{suffix}"
    staging = os.path.join(archive_dir, _STAGING_PREFIX + entry_name)
    os.mkdir(staging)
    files = []
    for path in names.data_files(data_dir, record.name):
        if not os.path.exists(path):
            continue
        target = os.path.join(staging, os.path.basename(path))
        move_no_clobber(path, target)
        files.append({"name": os.path.basename(path), "size": os.path.getsize(target),
                      "sha256": sha256_of(target)})
    manifest = {
        "formatVersion": 1,
        "entry": entry_name,
        "name": record.name,
        "id": record.id,
        "origin": record.origin,
        "createdAt": to_rfc3339(record.created_at),
        "archivedAt": to_rfc3339(now),
        "reason": reason,
        "files": files,
    }
    write_atomically(os.path.join(staging, MANIFEST),
                     json.dumps(manifest, indent=1).encode("utf-8") + b"\n")
    fsync_directory(data_dir)
    os.rename(staging, os.path.join(archive_dir, entry_name))
    fsync_directory(archive_dir)
    return manifest


@attrs.define(eq=False)
class Archiver:
    """
    Moves stopped namespaces into the archive, off the reactor thread.
    """

    data_dir: str
    run_in_thread: Callable[..., Deferred[Any]] = deferToThread

    @property
    def archive_dir(self) -> str:
        return os.path.join(self.data_dir, "archive")

    def archive(self, record: NamespaceRecord, reason: str, now: float) -> Deferred[dict[str, Any]]:
        """
        Move C{record}'s files into a new archive entry; fires with its
        manifest.  The caller has stopped the child and holds the name's lock.
        """
        return self.run_in_thread(_archive_files, self.data_dir, self.archive_dir, record, reason, now)

    def manifests(self) -> list[dict[str, Any]]:
        """
        Every complete entry's manifest (unreadable ones are skipped, logged).
        """
        found = []
        if not os.path.isdir(self.archive_dir):
            return found
        for entry in sorted(os.listdir(self.archive_dir)):
            if entry.startswith(_STAGING_PREFIX):
                continue
            try:
                with open(os.path.join(self.archive_dir, entry, MANIFEST), "rb") as handle:
                    found.append(json.loads(handle.read()))
            except (OSError, ValueError) as error:
                _log.warn("unreadable archive entry", entry=entry, error=str(error))
        return found

    def recover(self, live_ids: dict[str, str]) -> list[str]:
        """
        Finish what a crash interrupted (at start-up, before serving).

        A staging directory is an archive that did not complete: its files go
        back where they came from, so the namespace is live as before.  A
        complete entry whose namespace id is still live (the crash came
        before the state was saved) means the archive did complete: those
        names are returned so the caller drops them from the state.

        @param live_ids: name -> id of every namespace in the state.
        """
        finished: list[str] = []
        if not os.path.isdir(self.archive_dir):
            return finished
        for entry in sorted(os.listdir(self.archive_dir)):
            path = os.path.join(self.archive_dir, entry)
            if entry.startswith(_STAGING_PREFIX):
                self._undo_staging(path)
                continue
            manifest_path = os.path.join(path, MANIFEST)
            try:
                with open(manifest_path, "rb") as handle:
                    manifest = json.loads(handle.read())
            except (OSError, ValueError):
                continue
            name, entry_id = manifest.get("name"), manifest.get("id")
            if name in live_ids and live_ids[name] == entry_id and not any(
                os.path.exists(p) for p in names.data_files(self.data_dir, name)
            ):
                _log.warn("completing an archive interrupted by a crash", name=name, entry=entry)
                finished.append(name)
        return finished

    def _undo_staging(self, staging: str) -> None:
        for file_name in sorted(os.listdir(staging)):
            source = os.path.join(staging, file_name)
            if file_name == MANIFEST or file_name.startswith(MANIFEST + "."):
                os.unlink(source)
                continue
            try:
                move_no_clobber(source, os.path.join(self.data_dir, file_name))
            except FileExistsError:
                _log.error("cannot undo interrupted archive: a file of that name is live; "
                           "both are kept", staging=staging, file=file_name)
                return
            except OSError as error:
                if error.errno != errno.ENOENT:
                    raise
        _log.warn("undid an archive interrupted by a crash", staging=os.path.basename(staging))
        shutil.rmtree(staging)
