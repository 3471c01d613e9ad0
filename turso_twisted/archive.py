"""
The archive bin: C{<data dir>/archive/<name>.<timestamp>/}.

Archiving moves a stopped namespace's files (never copies, never deletes)
into a new entry with a C{manifest.json} naming the namespace, its id and
each file's size and sha256.  The entry is assembled in a hidden staging
directory and renamed into place only when complete.  Unarchiving checks
the manifest and every checksum before it moves anything back, under a
hidden C{.restoring-} name while it moves.  So a crash leaves either the
live files or a complete entry; L{Archiver.recover} finishes or undoes what
a crash interrupted.

Every operation that touches entries of a name runs under that name's lock
(see L{turso_twisted.namespaces}); the blocking work here runs in a thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from . import names
from .config import format_duration
from .errors import ApiError
from .state import NamespaceRecord, fsync_directory, write_atomically
from .timefmt import compact, from_rfc3339, to_rfc3339

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_STAGING_PREFIX = ".staging-"
_RESTORING_PREFIX = ".restoring-"
_ENTRY = re.compile(r"(?P<name>[a-z0-9][a-z0-9_-]{0,62})\.(?P<stamp>\d{8}T\d{6}\.\d{3}Z)(?:-\d+)?")

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


def parse_entry_name(entry: str) -> tuple[str, float]:
    """
    The namespace and archive time an entry's directory name encodes.

    @raise ValueError: if C{entry} is not an entry name.
    """
    match = _ENTRY.fullmatch(entry)
    if match is None:
        raise ValueError(f"{entry!r} is not an archive entry name (<name>.<timestamp>)")
    stamp = match.group("stamp")
    iso = f"{stamp[0:4]}-{stamp[4:6]}-{stamp[6:8]}T{stamp[9:11]}:{stamp[11:13]}:{stamp[13:]}"
    return match.group("name"), from_rfc3339(iso)


@attrs.frozen
class ArchiveEntry:
    """
    One complete entry: its directory name, namespace, time and manifest
    (C{None} when the manifest cannot be read).
    """

    entry: str
    name: str
    archived_at: float
    manifest: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.manifest or {})
        out.update(entry=self.entry, name=self.name, archivedAt=to_rfc3339(self.archived_at))
        if self.manifest is None:
            out["problem"] = "manifest missing or unreadable"
        return out


class ArchiveRefused(ApiError):
    pass


def _refuse(status: int, code: str, message: str) -> ArchiveRefused:
    return ArchiveRefused(status, code, message)


def _read_manifest(directory: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(directory, MANIFEST), "rb") as handle:
            manifest = json.loads(handle.read())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


# -- the blocking steps (run in a thread) ---------------------------------------


def new_entry_name(archive_dir: str, name: str, now: float) -> str:
    """
    A fresh entry name for C{name} at C{now}, taken by nothing yet.
    """
    entry_name = f"{name}.{compact(now)}"
    suffix = 0
    while any(os.path.lexists(os.path.join(archive_dir, prefix + entry_name))
              for prefix in ("", _STAGING_PREFIX, _RESTORING_PREFIX)):
        suffix += 1
        entry_name = f"{name}.{compact(now)}-{suffix}"
    return entry_name


def _archive_files(data_dir: str, archive_dir: str, record: NamespaceRecord,
                   reason: str, now: float, entry_name: str) -> dict[str, Any]:
    os.makedirs(archive_dir, exist_ok=True)
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
        "formatVersion": FORMAT_VERSION,
        "entry": entry_name,
        "name": record.name,
        "id": record.id,
        "origin": record.origin,
        "ttl": None if record.ttl is None else format_duration(record.ttl),
        "createdAt": to_rfc3339(record.created_at),
        "lastAccessAt": to_rfc3339(record.last_access_at),
        "archivedAt": to_rfc3339(now),
        "reason": reason,
        "history": record.history,
        "clients": sorted(record.clients),
        "retiredClients": sorted(record.retired),
        "files": files,
    }
    write_atomically(os.path.join(staging, MANIFEST),
                     json.dumps(manifest, indent=1).encode("utf-8") + b"\n")
    fsync_directory(data_dir)
    os.rename(staging, os.path.join(archive_dir, entry_name))
    fsync_directory(archive_dir)
    return manifest


def verify_entry(directory: str, entry: str, name: str) -> dict[str, Any]:
    """
    Check that the entry in C{directory} is a complete archive of C{name}:
    its manifest names C{name} and C{entry}, lists exactly the data files
    present, each with the size and sha256 recorded.

    @raise ArchiveRefused: 409 when it belongs to another namespace, 422
        when it is damaged or tampered with.
    """
    manifest = _read_manifest(directory)
    if manifest is None or manifest.get("formatVersion") != FORMAT_VERSION:
        raise _refuse(422, "archive_invalid", f"archive entry {entry}: manifest.json missing or unreadable")
    if manifest.get("name") != name or manifest.get("entry") != entry:
        raise _refuse(409, "archive_mismatch",
                      f"archive entry {entry} holds namespace {manifest.get('name')!r} "
                      f"(entry {manifest.get('entry')!r}), not {name!r}: refusing to restore it")
    if not isinstance(manifest.get("id"), str) or not manifest["id"]:
        raise _refuse(422, "archive_invalid", f"archive entry {entry}: manifest has no namespace id")
    allowed = {os.path.basename(path) for path in names.data_files("/", name)}
    listed = manifest.get("files")
    if not isinstance(listed, list) or not all(isinstance(f, dict) for f in listed):
        raise _refuse(422, "archive_invalid", f"archive entry {entry}: manifest lists no files")
    listed_names = [f.get("name") for f in listed]
    present = sorted(f for f in os.listdir(directory) if f != MANIFEST)
    if sorted(map(str, listed_names)) != present or not set(listed_names) <= allowed:
        raise _refuse(422, "archive_tampered",
                      f"archive entry {entry}: files {present} do not match the manifest's {listed_names}")
    for item in listed:
        path = os.path.join(directory, item["name"])
        if os.path.getsize(path) != item.get("size") or sha256_of(path) != item.get("sha256"):
            raise _refuse(422, "archive_tampered",
                          f"archive entry {entry}: {item['name']} does not match its recorded "
                          "size and sha256; refusing to restore it")
    return manifest


def _restore_files(data_dir: str, archive_dir: str, entry: str, name: str) -> dict[str, Any]:
    directory = os.path.join(archive_dir, entry)
    if not os.path.isdir(directory):
        raise _refuse(404, "archive_not_found", f"archive entry {entry} does not exist")
    manifest = verify_entry(directory, entry, name)
    for item in manifest["files"]:
        if os.path.lexists(os.path.join(data_dir, item["name"])):
            raise _refuse(409, "namespace_files_present",
                          f"{item['name']} exists in the data dir; refusing to overwrite it")
    restoring = os.path.join(archive_dir, _RESTORING_PREFIX + entry)
    os.rename(directory, restoring)
    # The main file last: where it is, the whole set is.
    for item in sorted(manifest["files"], key=lambda f: f["name"].endswith(".db")):
        move_no_clobber(os.path.join(restoring, item["name"]), os.path.join(data_dir, item["name"]))
    fsync_directory(data_dir)
    fsync_directory(archive_dir)
    return manifest


def _remove_tree(path: str) -> None:
    shutil.rmtree(path)
    fsync_directory(os.path.dirname(path))


@attrs.define(eq=False)
class Archiver:
    """
    Moves stopped namespaces into the archive and back, off the reactor
    thread.
    """

    data_dir: str
    run_in_thread: Callable[..., Deferred[Any]] = deferToThread

    @property
    def archive_dir(self) -> str:
        return os.path.join(self.data_dir, "archive")

    def new_entry_name(self, name: str, now: float) -> str:
        return new_entry_name(self.archive_dir, name, now)

    def archive(self, record: NamespaceRecord, reason: str, now: float,
                entry_name: str) -> Deferred[dict[str, Any]]:
        """
        Move C{record}'s files into the new archive entry C{entry_name};
        fires with its manifest.  The caller has stopped the child, holds
        the name's lock, and has saved C{entry_name} as the record's
        C{archiving} intent (see L{recover}).
        """
        return self.run_in_thread(_archive_files, self.data_dir, self.archive_dir, record, reason, now,
                                  entry_name)

    def entries(self, name: str | None = None) -> list[ArchiveEntry]:
        """
        Complete entries (of C{name}, if given), oldest first.  Reads the
        small manifests on the calling thread.
        """
        found = []
        try:
            listing = os.listdir(self.archive_dir)
        except FileNotFoundError:
            return found
        for entry in listing:
            try:
                entry_name, archived_at = parse_entry_name(entry)
            except ValueError:
                continue
            if name is not None and entry_name != name:
                continue
            directory = os.path.join(self.archive_dir, entry)
            if os.path.isdir(directory):
                found.append(ArchiveEntry(entry, entry_name, archived_at, _read_manifest(directory)))
        return sorted(found, key=lambda e: (e.archived_at, e.entry))

    def find(self, name: str, archived_at: str | None = None) -> ArchiveEntry:
        """
        The newest entry of C{name}, or the one archived at C{archived_at}.

        @raise ArchiveRefused: 404 if there is none.
        """
        candidates = self.entries(name)
        if archived_at is not None:
            try:
                wanted = from_rfc3339(archived_at)
            except ValueError:
                raise _refuse(400, "invalid_archived_at",
                              f"archivedAt {archived_at!r} is not an RFC 3339 timestamp") from None
            candidates = [e for e in candidates if abs(e.archived_at - wanted) < 0.0005]
        if not candidates:
            which = f" archived at {archived_at}" if archived_at else ""
            raise _refuse(404, "archive_not_found", f"no archive entry of namespace {name!r}{which}")
        return candidates[-1]

    def restore(self, entry: ArchiveEntry) -> Deferred[dict[str, Any]]:
        """
        Verify C{entry} and move its files back into the data dir; fires with
        the manifest.  Call L{finish_restore} once the state names the
        namespace again.
        """
        return self.run_in_thread(_restore_files, self.data_dir, self.archive_dir, entry.entry, entry.name)

    def finish_restore(self, entry: ArchiveEntry) -> Deferred[None]:
        """
        Drop what is left of a restored entry (its manifest).
        """
        restoring = os.path.join(self.archive_dir, _RESTORING_PREFIX + entry.entry)
        return self.run_in_thread(_remove_tree, restoring)

    def remove(self, entry: ArchiveEntry) -> Deferred[None]:
        """
        Delete an entry for good (retention, or an operator who needs space).
        """
        return self.run_in_thread(_remove_tree, os.path.join(self.archive_dir, entry.entry))

    # -- start-up --------------------------------------------------------------

    def recover(self, records: dict[str, NamespaceRecord]) -> list[str]:
        """
        Finish or undo what a crash interrupted (at start-up, before serving).

        An archive is announced in the state before any file moves (the
        record's C{archiving} names the entry), so nothing is guessed:

          - a record announcing an entry that is complete, while the
            namespace has no data file, had its archive done: its name is
            returned for the caller to drop (and tombstone) it;
          - a staging directory is an archive that did not complete: its
            files go back where they came from; the namespace stays live;
          - a restoring directory is an unarchive that did not complete: if
            the state holds the record it restored (same id and history) and
            the data file is there, it is finished; otherwise it is undone.

        @param records: the state's records, by name.
        """
        finished: list[str] = []
        if not os.path.isdir(self.archive_dir):
            return finished
        for entry in sorted(os.listdir(self.archive_dir)):
            path = os.path.join(self.archive_dir, entry)
            if entry.startswith(_STAGING_PREFIX):
                self._undo_staging(path)
            elif entry.startswith(_RESTORING_PREFIX):
                self._settle_restoring(path, entry[len(_RESTORING_PREFIX):], records)
        for name, record in records.items():
            if record.archiving is None:
                continue
            complete = os.path.isdir(os.path.join(self.archive_dir, record.archiving))
            if complete and not os.path.exists(names.db_path(self.data_dir, name)):
                _log.warn("completing an archive interrupted by a crash", name=name, entry=record.archiving)
                finished.append(name)
        return finished

    def _undo_staging(self, staging: str) -> None:
        """
        Move every data file of an interrupted archive back.  A crash
        between the link and the unlink of a move leaves the same file in
        both places: the staging copy is then just dropped.
        """
        kept = False
        for file_name in os.listdir(staging):
            source = os.path.join(staging, file_name)
            if file_name == MANIFEST or file_name.startswith(MANIFEST + "."):
                os.unlink(source)
                continue
            target = os.path.join(self.data_dir, file_name)
            if os.path.exists(target) and os.path.samefile(source, target):
                os.unlink(source)
                continue
            try:
                move_no_clobber(source, target)
            except FileExistsError:
                kept = True
                _log.error("cannot undo interrupted archive for this file: a different file of "
                           "that name is live; both are kept", staging=staging, file=file_name)
        if kept:
            return
        _log.warn("undid an archive interrupted by a crash", staging=os.path.basename(staging))
        shutil.rmtree(staging)

    def _settle_restoring(self, path: str, entry: str, records: dict[str, NamespaceRecord]) -> None:
        manifest = _read_manifest(path) or {}
        name = manifest.get("name")
        if not isinstance(name, str) or not names.is_valid(name):
            _log.error("unreadable interrupted restore left as it is", directory=path)
            return
        record = records.get(name)
        if (record is not None and record.id == manifest.get("id")
                and record.history == manifest.get("history")
                and os.path.exists(names.db_path(self.data_dir, name))):
            shutil.rmtree(path)
            return
        allowed = {os.path.basename(p) for p in names.data_files(self.data_dir, name)}
        for item in manifest.get("files", []):
            if item.get("name") not in allowed:
                continue
            live = os.path.join(self.data_dir, item["name"])
            back = os.path.join(path, item["name"])
            if os.path.exists(live) and os.path.exists(back) and os.path.samefile(live, back):
                os.unlink(live)  # the move got as far as the link
            elif os.path.exists(live) and not os.path.exists(back):
                move_no_clobber(live, back)
        os.rename(path, os.path.join(self.archive_dir, entry))
        _log.warn("undid a restore interrupted by a crash", name=name, entry=entry)
