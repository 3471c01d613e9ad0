"""
Start-up recovery: what runs once, holding the data dir lock, before
anything is served, so that state, archive and data files agree.

  - children left behind by an earlier daemon that was killed outright are
    killed (children get a parent-death signal, so the kernel normally
    kills them with the daemon; this is the second line);
  - scratch files of the earlier run are removed;
  - archives and unarchives a crash interrupted are finished or undone;
  - data files no record owns are quarantined, never served (the daemon
    serves only files it created).
"""

from __future__ import annotations

import os
import shutil
import signal
import time

from twisted.logger import Logger

from . import names
from .archive import (
    LEGACY_UNARCHIVING_PREFIX,
    MANIFEST,
    STAGING_PREFIX,
    UNARCHIVING_PREFIX,
    read_manifest,
)
from .datadir import temp_dir
from .files import fsync_directory, move_no_clobber
from .state import NamespaceRecord, StateStore
from .syncproto import HistoryGuard
from .timefmt import compact

_log = Logger()

#: Where files no namespace owns are moved at start-up.
QUARANTINE = "_quarantine"


def recover(data_dir: str, tursodb_bin: str, state: StateStore, guard: HistoryGuard,
            now: float) -> list[str]:
    """
    Everything start-up recovery does, in order; returns the files
    quarantined.
    """
    killed = kill_orphans(data_dir, tursodb_bin)
    if killed:
        _log.warn("killed orphaned tursodb processes: {pids}", pids=killed)
    clean_scratch(data_dir)
    return reconcile(data_dir, state, guard, now)


def clean_scratch(data_dir: str) -> None:
    """
    Remove what an earlier run left in C{_tmp/} and half-written state
    files.
    """
    scratch = temp_dir(data_dir)
    if os.path.isdir(scratch):
        shutil.rmtree(scratch)
    os.makedirs(scratch)
    state_dir = os.path.join(data_dir, "_state")
    for entry in os.listdir(state_dir):
        if ".tmp-" in entry:
            os.unlink(os.path.join(state_dir, entry))


def reconcile(data_dir: str, state: StateStore, guard: HistoryGuard, now: float) -> list[str]:
    """
    Make state, archive and data files agree: finish or undo archives and
    installs a crash interrupted, and quarantine data files no record owns.
    Returns the files quarantined.
    """
    finished = recover_archive(data_dir, state.records)
    changed = False
    for name in finished:
        record = state.records.pop(name)
        guard.retire(name, record.clients | record.retired)
        changed = True
    for record in state:
        if record.archiving is not None:
            # Announced but not done (or done and the new files are in):
            # the namespace is live as it stands.
            record.archiving = None
            changed = True
    for record in state:
        if record.installing:
            # A fork or a restore to a new name moves its main file last:
            # with it in place the install completed, else it did not.
            if os.path.exists(names.db_path(data_dir, record.name)):
                record.installing = False
            else:
                _log.warn("dropping namespace {name}: its install was interrupted by a crash",
                          name=record.name)
                del state.records[record.name]
            changed = True
    quarantined = quarantine_unrecorded(data_dir, set(state.records), now)
    for record in state:
        if not os.path.exists(names.db_path(data_dir, record.name)) and record.name not in finished:
            _log.warn("namespace {name} has no data file yet; it starts empty", name=record.name)
    if changed:
        state.save()
    return quarantined


def quarantine_unrecorded(data_dir: str, recorded: set[str], now: float) -> list[str]:
    """
    Move every data file of a name the state does not record into
    C{_quarantine/<timestamp>/}: the daemon serves only files it created,
    and a file that appeared in the data dir by any other way (planted
    through a child, copied by hand) is never adopted.  An operator who
    wants such a file served restores it (C{?allow_foreign=true}), which
    replays it through the checks.  Returns the files moved.
    """
    strays = []
    for entry in sorted(os.listdir(data_dir)):
        name = names.name_of_data_file(entry)
        path = os.path.join(data_dir, entry)
        if name is None or name in recorded or not (os.path.isfile(path) or os.path.islink(path)):
            continue
        strays.append(entry)
    if not strays:
        return []
    target = os.path.join(data_dir, QUARANTINE, compact(now))
    os.makedirs(target, exist_ok=True)
    for entry in strays:
        move_no_clobber(os.path.join(data_dir, entry), os.path.join(target, entry))
        _log.warn("quarantined {file}: no namespace of this daemon owns it (moved to {directory})",
                  file=entry, directory=target)
    fsync_directory(target)
    fsync_directory(data_dir)
    return strays


# -- interrupted archives and unarchives ------------------------------------------


def recover_archive(data_dir: str, records: dict[str, NamespaceRecord]) -> list[str]:
    """
    Finish or undo what a crash interrupted (at start-up, before serving).

    An archive is announced in the state before any file moves (the
    record's C{archiving} names the entry), so nothing is guessed:

      - a record announcing an entry that is complete, while the
        namespace has no data file, had its archive done: its name is
        returned for the caller to drop (and tombstone) it;
      - a staging directory is an archive that did not complete: its
        files go back where they came from; the namespace stays live;
      - an unarchiving directory is an unarchive that did not complete: if
        the state holds the record it restored (same id and history) and
        the data file is there, it is finished; otherwise it is undone.

    @param records: the state's records, by name.
    """
    archive_dir = os.path.join(data_dir, "archive")
    finished: list[str] = []
    if not os.path.isdir(archive_dir):
        return finished
    for entry in sorted(os.listdir(archive_dir)):
        path = os.path.join(archive_dir, entry)
        if entry.startswith(STAGING_PREFIX):
            _undo_staging(data_dir, path)
        elif entry.startswith((UNARCHIVING_PREFIX, LEGACY_UNARCHIVING_PREFIX)):
            _settle_unarchiving(data_dir, archive_dir, path, entry.partition("-")[2], records)
    for name, record in records.items():
        if record.archiving is None:
            continue
        complete = os.path.isdir(os.path.join(archive_dir, record.archiving))
        if complete and not os.path.exists(names.db_path(data_dir, name)):
            _log.warn("completing the archive of namespace {name} into {entry}, interrupted by a crash",
                      name=name, entry=record.archiving)
            finished.append(name)
    return finished


def _undo_staging(data_dir: str, staging: str) -> None:
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
        target = os.path.join(data_dir, file_name)
        if os.path.exists(target) and os.path.samefile(source, target):
            os.unlink(source)
            continue
        try:
            move_no_clobber(source, target)
        except FileExistsError:
            kept = True
            _log.error("cannot undo the interrupted archive {staging} for {file}: a different file of "
                       "that name is live; both are kept", staging=staging, file=file_name)
    if kept:
        return
    _log.warn("undid an archive interrupted by a crash: {staging}", staging=os.path.basename(staging))
    shutil.rmtree(staging)


def _settle_unarchiving(data_dir: str, archive_dir: str, path: str, entry: str,
                        records: dict[str, NamespaceRecord]) -> None:
    manifest = read_manifest(path) or {}
    name = manifest.get("name")
    if not isinstance(name, str) or not names.is_valid(name):
        _log.error("unreadable interrupted unarchive left as it is: {directory}", directory=path)
        return
    record = records.get(name)
    if (record is not None and record.id == manifest.get("id")
            and record.history == manifest.get("history")
            and os.path.exists(names.db_path(data_dir, name))):
        shutil.rmtree(path)
        return
    allowed = {os.path.basename(p) for p in names.data_files(data_dir, name)}
    for item in manifest.get("files", []):
        if item.get("name") not in allowed:
            continue
        live = os.path.join(data_dir, item["name"])
        back = os.path.join(path, item["name"])
        if os.path.exists(live) and os.path.exists(back) and os.path.samefile(live, back):
            os.unlink(live)  # the move got as far as the link
        elif os.path.exists(live) and not os.path.exists(back):
            move_no_clobber(live, back)
    os.rename(path, os.path.join(archive_dir, entry))
    _log.warn("undid an unarchive of namespace {name} from {entry}, interrupted by a crash",
              name=name, entry=entry)


# -- orphaned children -------------------------------------------------------------


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
    found: list[int] = []
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
        _log.warn("killing orphaned tursodb (pid {pid}) from an earlier run", pid=pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    return pids
