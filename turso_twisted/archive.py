"""
The archive bin: C{<data dir>/archive/<name>.<timestamp>/}.

Archiving moves a stopped namespace's files (never copies, never deletes)
into a new entry with a C{manifest.json} naming the namespace, its id and
each file's size and sha256.  The entry is assembled in a hidden staging
directory and renamed into place only when complete.  Unarchiving checks
the manifest and every checksum before it moves anything back, under a
hidden C{.unarchiving-} name while it moves.  So a crash leaves either the
live files or a complete entry; L{turso_twisted.recovery} finishes or undoes
what a crash interrupted.

Every operation that touches entries of a name runs under that name's lock
(see L{turso_twisted.namespaces}); the blocking work here runs in a thread.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from . import names
from .errors import Conflict, Invalid, NotFound, Unprocessable
from .files import RunInThread, fsync_directory, move_no_clobber, sha256_and_size, write_atomically
from .state import NamespaceRecord, new_history
from .timefmt import compact, from_rfc3339, to_rfc3339

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
STAGING_PREFIX = ".staging-"
UNARCHIVING_PREFIX = ".unarchiving-"
#: What earlier versions called an unarchive under way (see L{turso_twisted.recovery}).
LEGACY_UNARCHIVING_PREFIX = ".restoring-"
_ENTRY = re.compile(r"(?P<name>[a-z0-9][a-z0-9_-]{0,62})\.(?P<stamp>\d{8}T\d{6}\.\d{3}Z)(?:-\d+)?")


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


def read_manifest(directory: str) -> dict[str, Any] | None:
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
              for prefix in ("", STAGING_PREFIX, UNARCHIVING_PREFIX, LEGACY_UNARCHIVING_PREFIX)):
        suffix += 1
        entry_name = f"{name}.{compact(now)}-{suffix}"
    return entry_name


def _build_entry(data_dir: str, archive_dir: str, record: NamespaceRecord,
                 reason: str, now: float, entry_name: str) -> dict[str, Any]:
    os.makedirs(archive_dir, exist_ok=True)
    staging = os.path.join(archive_dir, STAGING_PREFIX + entry_name)
    os.mkdir(staging)
    files = []
    for path in names.data_files(data_dir, record.name):
        if not os.path.exists(path):
            continue
        target = os.path.join(staging, os.path.basename(path))
        move_no_clobber(path, target)
        sha256, size = sha256_and_size(target)
        files.append({"name": os.path.basename(path), "size": size, "sha256": sha256})
    manifest = {"formatVersion": FORMAT_VERSION, "entry": entry_name, **record.to_json(),
                "archivedAt": to_rfc3339(now), "reason": reason, "files": files}
    del manifest["archiving"], manifest["installing"]
    write_atomically(os.path.join(staging, MANIFEST),
                     json.dumps(manifest, indent=1).encode("utf-8") + b"\n")
    fsync_directory(data_dir)
    os.rename(staging, os.path.join(archive_dir, entry_name))
    fsync_directory(archive_dir)
    return manifest


def record_from_manifest(manifest: dict[str, Any], locked: bool, now: float) -> NamespaceRecord:
    """
    The record an entry's manifest describes, validated as the state file's
    records are, taking the lock given and an access at C{now}.

    @raise ValueError: if the manifest does not describe a valid record.
    """
    # Entries from before histories were kept get a new one.
    return NamespaceRecord.from_json(manifest.get("name", ""), {
        **manifest, "history": manifest.get("history") or new_history(),
        "locked": locked, "lastAccessAt": to_rfc3339(now), "archiving": None, "installing": False,
        # A copy archived in the middle of a move comes back as a namespace of its own.
        "movingIn": False, "movingTo": None})


def verify_entry(directory: str, entry: str, name: str) -> dict[str, Any]:
    """
    Check that the entry in C{directory} is a complete archive of C{name}:
    its manifest names C{name} and C{entry}, describes a valid record, and
    lists exactly the data files present, each with the size and sha256
    recorded.

    @raise Conflict: when it belongs to another namespace.
    @raise Unprocessable: when it is damaged or tampered with.
    """
    manifest = read_manifest(directory)
    if manifest is None or manifest.get("formatVersion") != FORMAT_VERSION:
        raise Unprocessable("archive_invalid", f"archive entry {entry}: manifest.json missing or unreadable")
    if manifest.get("name") != name or manifest.get("entry") != entry:
        raise Conflict("archive_mismatch",
                       f"archive entry {entry} holds namespace {manifest.get('name')!r} "
                       f"(entry {manifest.get('entry')!r}), not {name!r}: refusing to unarchive it")
    try:
        record_from_manifest(manifest, True, 0.0)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise Unprocessable("archive_invalid", f"archive entry {entry}: manifest: {error}") from None
    allowed = {os.path.basename(path) for path in names.data_files("/", name)}
    listed = manifest.get("files")
    if not isinstance(listed, list) or not all(isinstance(f, dict) for f in listed):
        raise Unprocessable("archive_invalid", f"archive entry {entry}: manifest lists no files")
    listed_names = [f.get("name") for f in listed]
    present = sorted(f for f in os.listdir(directory) if f != MANIFEST)
    if sorted(map(str, listed_names)) != present or not set(listed_names) <= allowed:
        raise Unprocessable("archive_tampered",
                            f"archive entry {entry}: files {present} do not match the manifest's "
                            f"{listed_names}")
    for item in listed:
        path = os.path.join(directory, item["name"])
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise Unprocessable("archive_tampered",
                                f"archive entry {entry}: {item['name']} is not a regular file; "
                                "refusing to unarchive it")
        if sha256_and_size(path) != (item.get("sha256"), item.get("size")):
            raise Unprocessable("archive_tampered",
                                f"archive entry {entry}: {item['name']} does not match its recorded "
                                "size and sha256; refusing to unarchive it")
    return manifest


def _unarchive_files(data_dir: str, archive_dir: str, entry: str, name: str) -> dict[str, Any]:
    directory = os.path.join(archive_dir, entry)
    if not os.path.isdir(directory):
        raise NotFound("archive_not_found", f"archive entry {entry} does not exist")
    manifest = verify_entry(directory, entry, name)
    for item in manifest["files"]:
        if os.path.lexists(os.path.join(data_dir, item["name"])):
            raise Conflict("namespace_files_present",
                           f"{item['name']} exists in the data dir; refusing to overwrite it")
    unarchiving = os.path.join(archive_dir, UNARCHIVING_PREFIX + entry)
    os.rename(directory, unarchiving)
    # The main file last: where it is, the whole set is.
    for item in sorted(manifest["files"], key=lambda f: f["name"].endswith(".db")):
        move_no_clobber(os.path.join(unarchiving, item["name"]), os.path.join(data_dir, item["name"]))
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
    run_in_thread: RunInThread = deferToThread

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
        C{archiving} intent (see L{turso_twisted.recovery}).
        """
        return self.run_in_thread(_build_entry, self.data_dir, self.archive_dir, record, reason, now,
                                  entry_name)

    def entries(self, name: str | None = None) -> list[ArchiveEntry]:
        """
        Complete entries (of C{name}, if given), oldest first.  Reads the
        small manifests on the calling thread.
        """
        found: list[ArchiveEntry] = []
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
                found.append(ArchiveEntry(entry, entry_name, archived_at, read_manifest(directory)))
        return sorted(found, key=lambda e: (e.archived_at, e.entry))

    def list_entries(self, name: str | None = None) -> Deferred[list[ArchiveEntry]]:
        """
        L{entries}, read in a thread.
        """
        return self.run_in_thread(self.entries, name)

    def find(self, name: str, archived_at: str | None = None) -> ArchiveEntry:
        """
        The newest entry of C{name}, or the one archived at C{archived_at}.

        @raise NotFound: if there is none.
        """
        candidates = self.entries(name)
        if archived_at is not None:
            try:
                wanted = from_rfc3339(archived_at)
            except ValueError:
                raise Invalid("invalid_archived_at",
                              f"archivedAt {archived_at!r} is not an RFC 3339 timestamp") from None
            candidates = [e for e in candidates if abs(e.archived_at - wanted) < 0.0005]
        if not candidates:
            which = f" archived at {archived_at}" if archived_at else ""
            raise NotFound("archive_not_found", f"no archive entry of namespace {name!r}{which}")
        return candidates[-1]

    def unarchive(self, entry: ArchiveEntry) -> Deferred[dict[str, Any]]:
        """
        Verify C{entry} and move its files back into the data dir; fires with
        the manifest.  Call L{finish_unarchive} once the state names the
        namespace again.
        """
        return self.run_in_thread(_unarchive_files, self.data_dir, self.archive_dir, entry.entry,
                                  entry.name)

    def finish_unarchive(self, entry: ArchiveEntry) -> Deferred[None]:
        """
        Drop what is left of an unarchived entry (its manifest).
        """
        return self.run_in_thread(_remove_tree, os.path.join(self.archive_dir,
                                                             UNARCHIVING_PREFIX + entry.entry))

    def remove(self, entry: ArchiveEntry) -> Deferred[None]:
        """
        Delete an entry for good (retention, or an operator who needs space).
        """
        return self.run_in_thread(_remove_tree, os.path.join(self.archive_dir, entry.entry))
