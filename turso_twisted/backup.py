"""
Hot backups, verified restores and forks.

A backup is C{VACUUM INTO} a file in the child's scratch dir (moved to
C{_tmp/} at once) through the live child (a
consistent copy while the namespace keeps serving), stamped with an
identity table (C{turso_server_backup}: namespace, id, history, times,
server version) that any SQLite tool can read.  A restore checks the file
(SQLite, integrity, identity of this namespace) before anything changes,
builds the new database by replaying the file into a scratch child (see
L{turso_twisted.replay}), and only then swaps it in, archiving the current
files.  A fork builds a new namespace the same way from a backup of
another.  Every swap gives the files a new history, so replicas of the
old data are refused rather than left to diverge.

Backups, restores and forks of one namespace run one at a time; different
namespaces' run side by side.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import uuid
from typing import IO

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import __version__, names
from .archival import Archival
from .channel import BackendTimeout, ChannelClosed, QueueFull, QueueTimeout
from .errors import (
    Conflict,
    Failed,
    Forbidden,
    Invalid,
    TimedOut,
    Unavailable,
    Unprocessable,
    not_found,
    out_of_space,
)
from .files import RunInThread, remove_database_copy, remove_paths, sha256_and_size
from .gate import check_document
from .hrana import ChildSQLError, execute, pipeline
from .locks import KeyedLocks
from .namespaces import NamespaceManager
from .replay import SqliteSource, next_request, open_read_only
from .state import NamespaceRecord
from .supervisor import Supervisor
from .timefmt import compact, to_rfc3339

IDENTITY_TABLE = "turso_server_backup"
#: How long a child may take to write a backup copy (not the request deadline).
BACKUP_TIMEOUT = 3600.0
SQLITE_MAGIC = b"SQLite format 3\x00"


@attrs.frozen
class BackupFile:
    path: str
    name: str
    namespace_id: str
    filename: str
    sha256: str
    size: int


@attrs.frozen
class Identity:
    namespace: str
    namespace_id: str
    history: str
    backup_at: str


def _stamp(path: str, identity: dict[str, str]) -> tuple[str, int]:
    """
    Write the identity table into a fresh backup copy; return its sha256
    and size.
    """
    connection = sqlite3.connect(path)
    try:
        with connection:
            connection.execute(f"DROP TABLE IF EXISTS {IDENTITY_TABLE}")
            columns = ", ".join(f"{key} TEXT NOT NULL" for key in identity)
            connection.execute(f"CREATE TABLE {IDENTITY_TABLE} ({columns})")
            connection.execute(f"INSERT INTO {IDENTITY_TABLE} VALUES ({', '.join('?' for _ in identity)})",
                               list(identity.values()))
    finally:
        connection.close()
    return sha256_and_size(path)


def inspect_backup(path: str) -> tuple[Identity | None, set[str]]:
    """
    Check that C{path} is a sound SQLite file and read its identity and the
    client ids of replicas that had pushed to it.

    @raise Unprocessable: when it is not a SQLite file or fails its
        integrity check.
    """
    with open(path, "rb") as handle:
        if handle.read(16) != SQLITE_MAGIC:
            raise Unprocessable("not_sqlite", "the body is not a SQLite database file")
    try:
        connection = open_read_only(path)
        try:
            problems = [row[0] for row in connection.execute("PRAGMA integrity_check")]
            if problems != ["ok"]:
                raise Unprocessable("integrity_check_failed",
                               f"the file fails PRAGMA integrity_check: {'; '.join(problems[:3])}")
            tables = {row[0] for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type='table'")}
            identity = None
            if IDENTITY_TABLE in tables:
                row = connection.execute(
                    f"SELECT namespace, namespace_id, history, backup_at FROM {IDENTITY_TABLE}").fetchone()
                if row is not None and all(isinstance(v, str) and v for v in row):
                    identity = Identity(*row)
            clients: set[str] = set()
            if "turso_sync_last_change_id" in tables:
                clients = {row[0] for row in connection.execute(
                    "SELECT client_id FROM turso_sync_last_change_id") if isinstance(row[0], str)}
        finally:
            connection.close()
    except sqlite3.DatabaseError as error:
        raise Unprocessable("not_sqlite", f"the file cannot be read as SQLite: {error}") from None
    return identity, clients


def _save_upload(content: IO[bytes], path: str) -> None:
    content.seek(0)
    with open(path, "wb") as target:
        shutil.copyfileobj(content, target, 1 << 20)


@attrs.define(eq=False)
class Backups:
    reactor: IReactorTime
    manager: NamespaceManager
    archival: Archival
    supervisor: Supervisor
    #: Where copies and builds are made (C{_tmp/} of the data dir).
    scratch: str
    run_in_thread: RunInThread = deferToThread
    backups: int = 0
    backup_bytes: int = 0
    backup_seconds: float = 0.0
    restores: int = 0
    forks: int = 0
    _jobs: KeyedLocks = attrs.field(factory=KeyedLocks)
    _log = Logger()

    def _scratch_path(self, kind: str, name: str) -> str:
        return os.path.join(self.scratch, f"{kind}-{name}-{uuid.uuid4().hex}")

    # -- backup ----------------------------------------------------------------

    def take(self, name: str) -> Deferred[BackupFile]:
        """
        A consistent copy of C{name}, stamped with its identity, in a temp
        file the caller must remove (see L{remove_database_copy}).

        Cancelling (a client that goes away) does not stop the copy, which
        the child is making anyway: the job runs to its end, holding the
        namespace's backup turn, and then removes its file.
        """
        names.validate(name)
        job = self._jobs.run(name, lambda: self._take(name))
        abandoned = [False]

        def cancel(_: Deferred[BackupFile]) -> None:
            abandoned[0] = True

        result: Deferred[BackupFile] = Deferred(cancel)

        def finished(outcome: BackupFile | Failure) -> None:
            if abandoned[0]:
                if isinstance(outcome, BackupFile):
                    remove_database_copy(outcome.path)
                return
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)

        job.addBoth(finished)
        return result

    async def _take(self, name: str) -> BackupFile:
        if self.manager.get(name) is None:
            raise not_found(name)
        path = self._scratch_path("backup", name) + ".db"
        now = self.reactor.seconds()
        try:
            with await self.manager.lease(name, data_request=False) as lease:
                # The record read under the lease is the incarnation copied.
                record = self.manager.get(name)
                assert record is not None
                # The child writes the copy in its own scratch dir (the one
                # place outside its files it may write); it moves out at once.
                written = os.path.join(lease.child.scratch, os.path.basename(path))
                try:
                    quoted = written.replace("'", "''")
                    # A large namespace takes its time to copy.
                    await pipeline(lease.channel, [execute(f"VACUUM INTO '{quoted}'")], BACKUP_TIMEOUT)
                    os.rename(written, path)
                except ChildSQLError as error:
                    if error.out_of_space:
                        raise out_of_space() from None
                    raise Failed("backup_failed",
                                 f"namespace {name!r}: VACUUM INTO failed: {error}") from None
                except BackendTimeout as error:
                    raise TimedOut("backend_timeout", f"namespace {name!r}: the copy gave {error}; "
                                   "its child was restarted") from None
                except (QueueFull, QueueTimeout, ChannelClosed) as error:
                    raise Unavailable("namespace_busy",
                                      f"namespace {name!r}: the backup could not get its turn: {error}",
                                      retry_after=5) from None
                finally:
                    remove_database_copy(written)
            identity = {
                "namespace": name,
                "namespace_id": record.id,
                "history": record.history,
                "created_at": to_rfc3339(record.created_at),
                "backup_at": to_rfc3339(now),
                "server_version": f"turso-server {__version__}",
            }
            sha256, size = await self.run_in_thread(_stamp, path, identity)
        except BaseException:
            remove_database_copy(path)
            raise
        self.backups += 1
        self.backup_bytes += size
        self.backup_seconds += self.reactor.seconds() - now
        self._log.info("backup of namespace {name} taken: {bytes} bytes, sha256 {sha256}", name=name,
                       id=record.id, bytes=size, sha256=sha256)
        return BackupFile(path=path, name=name, namespace_id=record.id,
                          filename=f"{name}.{compact(now)}.db", sha256=sha256, size=size)

    # -- restore and fork ------------------------------------------------------

    def restore(self, name: str, content: IO[bytes], source: str | None = None,
                allow_foreign: bool = False,
                allow_other_incarnation: bool = False) -> Deferred[NamespaceRecord]:
        """
        Replace C{name}'s data with the SQLite file in C{content}, after
        checking it; fires with the namespace record.
        """
        names.validate(name)
        if source is not None:
            names.validate(source)
        return self._jobs.run(name, lambda: self._restore(name, content, source, allow_foreign,
                                                          allow_other_incarnation))

    async def _restore(self, name: str, content: IO[bytes], source: str | None,
                       allow_foreign: bool, allow_other_incarnation: bool) -> NamespaceRecord:
        upload = self._scratch_path("upload", name) + ".db"
        try:
            await self.run_in_thread(_save_upload, content, upload)
            identity, clients = await self.run_in_thread(inspect_backup, upload)
            expected = source or name
            if identity is None:
                if not allow_foreign:
                    raise Unprocessable("backup_without_identity",
                                   "the file carries no turso-server backup identity; pass "
                                   "?allow_foreign=true to restore it anyway")
            elif identity.namespace != expected:
                hint = (f"; pass ?source={identity.namespace} to restore it into {name!r} on purpose"
                        if source is None else "")
                raise Conflict("backup_of_another_namespace",
                               f"this backup is of namespace {identity.namespace!r}, not {expected!r}"
                               + hint)
            live = self.manager.get(name)
            if (identity is not None and source is None and live is not None
                    and identity.namespace_id != live.id and not allow_other_incarnation):
                # The name was deleted and used again since: the backup is of
                # another tenant of the same name.
                raise Conflict("backup_of_another_incarnation",
                               f"this backup is of an earlier incarnation of {name!r} (id "
                               f"{identity.namespace_id}), not of the live one (id {live.id}); pass "
                               "?allow_other_incarnation=true to restore it anyway")
            build = await self._build(name, upload)
            try:
                keep_id = identity.namespace_id if identity and identity.namespace == name else None
                origin = (f"backup of {identity.namespace!r} taken {identity.backup_at}"
                          if identity else "a file without identity")
                record = await self.archival.replace_files(
                    name, build, retired=clients, namespace_id=keep_id,
                    reason=f"replaced by a restore from {origin}")
            finally:
                remove_paths(build)
        finally:
            remove_paths(upload)
        self.restores += 1
        self._log.info("namespace {name} restored from a backup of {source}", name=name, id=record.id,
                       history=record.history, source=identity.namespace if identity else None)
        return record

    def fork(self, source: str, target: str) -> Deferred[NamespaceRecord]:
        """
        Make C{target} a new explicit namespace holding a consistent copy of
        C{source}; fires with the new record.
        """
        names.validate(source)
        names.validate(target)
        return self._jobs.run(target, lambda: self._fork(source, target))

    async def _fork(self, source: str, target: str) -> NamespaceRecord:
        if self.manager.get(target) is not None:
            raise Conflict("namespace_exists", f"namespace {target!r} exists already")
        if source == target:
            raise Invalid("bad_request", "a namespace cannot be forked onto itself")
        backup = await self.take(source)
        try:
            build = await self._build(target, backup.path)
            try:
                record = await self.archival.install_new(target, build, reason=f"fork of {source!r}")
            finally:
                remove_paths(build)
        finally:
            remove_database_copy(backup.path)
        self.forks += 1
        self._log.info("namespace {name} forked from {source}", name=target, source=source, id=record.id)
        return record

    async def _build(self, name: str, source_path: str) -> str:
        """
        Replay C{source_path} into a new database for C{name} in a scratch
        directory, with a scratch child; return the directory.
        """
        build = self._scratch_path("build", name)
        os.makedirs(build)
        child = None
        source = None
        try:
            child = await self.supervisor.start_scratch(f"build-{name}", names.db_path(build, name))
            source = await self.run_in_thread(SqliteSource, source_path)
            requests = iter(source.requests())
            while (request := await self.run_in_thread(next_request, requests)) is not None:
                # A backup's schema is replayed as SQL: it passes the same
                # gate as a client's statements (a view or trigger could
                # call load_extension).
                check_document({"requests": [request]})
                await pipeline(child.channel, [request])
        except Forbidden as error:
            remove_paths(build)
            raise Unprocessable("statement_not_allowed",
                                f"the backup holds SQL the server does not run: {error.message}") from None
        except ChildSQLError as error:
            remove_paths(build)
            if error.out_of_space:
                raise out_of_space() from None
            raise Unprocessable(
                "replay_failed", f"tursodb refused the backup's content while rebuilding it: {error}",
            ) from None
        except (sqlite3.Error, ValueError) as error:
            remove_paths(build)
            raise Unprocessable("replay_failed", f"the backup's content cannot be read: {error}") from None
        except BaseException:
            remove_paths(build)
            raise
        finally:
            if source is not None:
                source.close()
            if child is not None:
                await self.supervisor.stop_scratch(child)
        return build
