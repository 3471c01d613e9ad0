"""
Archive and unarchive: checks before anything moves, and crash safety
proven by crashing at every step and restarting.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from turso_twisted import archive as archive_module
from turso_twisted.archive import parse_entry_name, verify_entry
from turso_twisted.errors import Refusal, status_for
from turso_twisted.state import NamespaceRecord, StateStore

from .support import ManagerFixture

CONTENT = {"alpha.db": b"main file", "alpha.db-wal": b"wal frames", "alpha.db-log": b"logical log"}


class Crash(Exception):
    """
    Stands for the process dying at this point.
    """


class CrashAt:
    """
    Makes the Nth call among the patched operations raise L{Crash}.
    """

    def __init__(self, case: SynchronousTestCase, at: int) -> None:
        self.at = at
        self.calls = 0
        self.fired = False
        real_move = archive_module.move_no_clobber
        real_write = archive_module.write_atomically
        real_rename = os.rename
        real_save = StateStore.save
        real_remove = archive_module._remove_tree
        case.patch(archive_module, "move_no_clobber", self.wrap(real_move))
        case.patch(archive_module, "write_atomically", self.wrap(real_write))
        case.patch(archive_module, "_remove_tree", self.wrap(real_remove))
        case.patch(os, "rename", self.wrap(real_rename))
        case.patch(StateStore, "save", self.wrap(real_save))

    def wrap(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def step(*args: Any, **kwargs: Any) -> Any:
            if self.calls == self.at:
                self.fired = True
                self.calls += 1
                raise Crash(f"crash at step {self.at}")
            self.calls += 1
            return real(*args, **kwargs)

        return step


class ArchiveTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.data_dir = self.mktemp()
        self.fx = self.start()

    def start(self) -> ManagerFixture:
        fx = ManagerFixture(self.data_dir)
        fx.reactor.exit_on_signal = True
        fx.reconcile()
        return fx

    def make_alpha(self, origin: str = "auto") -> NamespaceRecord:
        record = NamespaceRecord.new("alpha", origin, self.fx.reactor.seconds())  # type: ignore[arg-type]
        record.ttl = 3600
        self.fx.state.records["alpha"] = record
        self.fx.state.save()
        for file_name, content in CONTENT.items():
            with open(os.path.join(self.data_dir, file_name), "wb") as handle:
                handle.write(content)
        return record

    def data_files(self) -> dict[str, bytes]:
        out = {}
        for file_name in CONTENT:
            path = os.path.join(self.data_dir, file_name)
            if os.path.exists(path):
                with open(path, "rb") as handle:
                    out[file_name] = handle.read()
        return out

    def archive_listing(self) -> list[str]:
        directory = os.path.join(self.data_dir, "archive")
        return sorted(os.listdir(directory)) if os.path.isdir(directory) else []

    def assertConsistent(self, record_id: str) -> str:
        """
        Either live with all its files, or archived completely: never half.
        """
        live = self.fx.state.records.get("alpha")
        entries = self.fx.archival.archiver.entries("alpha")
        self.assertEqual([e for e in self.archive_listing() if e.startswith(".")], [])
        if live is not None:
            self.assertEqual(live.id, record_id)
            self.assertEqual(self.data_files(), CONTENT)
            self.assertEqual(entries, [])
            return "live"
        self.assertEqual(self.data_files(), {})
        self.assertEqual(len(entries), 1)
        directory = os.path.join(self.data_dir, "archive", entries[0].entry)
        manifest = verify_entry(directory, entries[0].entry, "alpha")
        self.assertEqual(manifest["id"], record_id)
        for file_name, content in CONTENT.items():
            with open(os.path.join(directory, file_name), "rb") as handle:
                self.assertEqual(handle.read(), content)
        return "archived"


class CrashSafetyTests(ArchiveTestCase):
    def test_archive_crashing_at_every_step(self) -> None:
        outcomes = []
        for at in range(20):
            shutil.rmtree(self.data_dir)
            self.fx = self.start()
            record = self.make_alpha()
            crash = CrashAt(self, at)
            archived = self.fx.archival.archive("alpha", "test")
            if not crash.fired:
                self.successResultOf(archived)
                self.assertEqual(self.assertConsistent(record.id), "archived")
                break
            self.failureResultOf(archived, Crash)
            self.flushLoggedErrors(Crash)
            self.restore_patches()
            self.fx = self.start()
            outcomes.append(self.assertConsistent(record.id))
        else:
            self.fail("the archive never completed")
        # Early crashes leave it live, late ones archived: both were seen.
        self.assertIn("live", outcomes)
        self.assertIn("archived", outcomes)

    def test_unarchive_crashing_at_every_step(self) -> None:
        outcomes = []
        for at in range(20):
            shutil.rmtree(self.data_dir)
            self.fx = self.start()
            record = self.make_alpha()
            self.successResultOf(self.fx.archival.archive("alpha", "test"))
            crash = CrashAt(self, at)
            restored = self.fx.archival.unarchive("alpha")
            if not crash.fired:
                self.successResultOf(restored)
                self.assertEqual(self.assertConsistent(record.id), "live")
                break
            self.failureResultOf(restored, Crash)
            self.restore_patches()
            self.fx = self.start()
            outcomes.append(self.assertConsistent(record.id))
        else:
            self.fail("the unarchive never completed")
        self.assertIn("live", outcomes)
        self.assertIn("archived", outcomes)

    def restore_patches(self) -> None:
        for cleanup in list(self._cleanups):
            function = cleanup[0]
            if getattr(function, "__name__", "") == "restore":
                function()
                self._cleanups.remove(cleanup)


class UnarchiveTests(ArchiveTestCase):
    def archive_alpha(self) -> dict[str, Any]:
        self.make_alpha()
        return self.successResultOf(self.fx.archival.archive("alpha", "test"))

    def refused(self, status: int, code: str, **kwargs: Any) -> Refusal:
        failure = self.failureResultOf(self.fx.archival.unarchive("alpha", **kwargs), Refusal)
        self.assertEqual((status_for(failure.value), failure.value.code), (status, code),
                         failure.value.message)
        return failure.value

    def test_round_trip_keeps_identity(self) -> None:
        manifest = self.archive_alpha()
        self.fx.reactor.advance(100)
        record = self.successResultOf(self.fx.archival.unarchive("alpha"))
        self.assertEqual((record.id, record.origin, record.locked, record.ttl),
                         (manifest["id"], "auto", True, 3600))
        self.assertEqual(record.last_access_at, self.fx.reactor.seconds())
        self.assertEqual(self.data_files(), CONTENT)
        self.assertEqual(self.archive_listing(), [])
        self.assertEqual(StateStore.for_data_dir(self.data_dir, self.fx.reactor).path,
                         self.fx.state.path)

    def test_unlocked_on_request(self) -> None:
        self.archive_alpha()
        record = self.successResultOf(self.fx.archival.unarchive("alpha", locked=False))
        self.assertFalse(record.locked)

    def test_pick_by_archived_at_and_newest_by_default(self) -> None:
        first = self.archive_alpha()
        self.fx.reactor.advance(10)
        self.make_alpha()
        second = self.successResultOf(self.fx.archival.archive("alpha", "test"))
        self.assertNotEqual(first["id"], second["id"])
        record = self.successResultOf(self.fx.archival.unarchive("alpha", archived_at=first["archivedAt"]))
        self.assertEqual(record.id, first["id"])
        self.successResultOf(self.fx.archival.archive("alpha", "again"))
        record = self.successResultOf(self.fx.archival.unarchive("alpha"))
        self.assertEqual(record.id, first["id"], "the newest entry is the one just archived")

    def test_refused_while_live(self) -> None:
        self.archive_alpha()
        leased = self.fx.manager.lease("alpha")
        self.fx.settle()
        self.successResultOf(leased).release()
        self.refused(409, "namespace_exists")

    def test_refused_without_entry(self) -> None:
        self.refused(404, "archive_not_found")
        self.archive_alpha()
        self.refused(404, "archive_not_found", archived_at="2020-01-01T00:00:00.000Z")
        self.refused(400, "invalid_archived_at", archived_at="yesterday")

    def entry_dir(self) -> str:
        [entry] = self.fx.archival.archiver.entries("alpha")
        return os.path.join(self.data_dir, "archive", entry.entry)

    def assertNothingChanged(self, listing: list[str]) -> None:
        self.assertNotIn("alpha", self.fx.state.records)
        self.assertEqual(self.data_files(), {})
        self.assertEqual(self.archive_listing(), listing)

    def test_tampered_file_refused(self) -> None:
        self.archive_alpha()
        listing = self.archive_listing()
        with open(os.path.join(self.entry_dir(), "alpha.db"), "ab") as handle:
            handle.write(b"evil")
        self.refused(422, "archive_tampered")
        self.assertNothingChanged(listing)

    def test_extra_or_missing_file_refused(self) -> None:
        self.archive_alpha()
        listing = self.archive_listing()
        with open(os.path.join(self.entry_dir(), "beta.db"), "wb") as handle:
            handle.write(b"someone else")
        self.refused(422, "archive_tampered")
        os.unlink(os.path.join(self.entry_dir(), "beta.db"))
        os.unlink(os.path.join(self.entry_dir(), "alpha.db-log"))
        self.refused(422, "archive_tampered")
        self.assertNothingChanged(listing)

    def test_edited_manifest_refused_before_anything_moves(self) -> None:
        """
        A manifest whose sums still match but whose record is not one the
        state would accept is refused before a file moves.
        """
        for change in ({"ttl": "forever"}, {"createdAt": 1700000000}, {"history": "x y"},
                       {"origin": "weird"}, {"clients": "all"}):
            self.archive_alpha()
            path = os.path.join(self.entry_dir(), "manifest.json")
            with open(path) as handle:
                manifest = json.load(handle)
            with open(path, "w") as handle:
                json.dump({**manifest, **change}, handle)
            listing = self.archive_listing()
            self.refused(422, "archive_invalid")
            self.assertNothingChanged(listing)
            self.successResultOf(self.fx.archival.remove_archive_entry(
                self.fx.archival.archiver.find("alpha")))

    def test_symlink_instead_of_a_file_refused(self) -> None:
        self.archive_alpha()
        directory = self.entry_dir()
        outside = os.path.abspath(self.mktemp())
        os.rename(os.path.join(directory, "alpha.db"), outside)
        os.symlink(outside, os.path.join(directory, "alpha.db"))
        listing = self.archive_listing()
        self.refused(422, "archive_tampered")
        self.assertNothingChanged(listing)
        self.assertFalse(os.path.lexists(os.path.join(self.fx.data_dir, "alpha.db")))

    def test_manifest_of_another_namespace_refused(self) -> None:
        self.archive_alpha()
        path = os.path.join(self.entry_dir(), "manifest.json")
        with open(path) as handle:
            manifest = json.load(handle)
        manifest["name"] = "beta"
        with open(path, "w") as handle:
            json.dump(manifest, handle)
        error = self.refused(409, "archive_mismatch")
        self.assertIn("'beta'", error.message)

    def test_manifest_naming_other_files_refused(self) -> None:
        self.archive_alpha()
        directory = self.entry_dir()
        os.rename(os.path.join(directory, "alpha.db"), os.path.join(directory, "beta.db"))
        path = os.path.join(directory, "manifest.json")
        with open(path) as handle:
            manifest = json.load(handle)
        for item in manifest["files"]:
            if item["name"] == "alpha.db":
                item["name"] = "beta.db"
        with open(path, "w") as handle:
            json.dump(manifest, handle)
        self.refused(422, "archive_tampered")
        self.assertFalse(os.path.exists(os.path.join(self.data_dir, "beta.db")))

    def test_unreadable_manifest_refused(self) -> None:
        self.archive_alpha()
        with open(os.path.join(self.entry_dir(), "manifest.json"), "w") as handle:
            handle.write("{")
        self.refused(422, "archive_invalid")

    def test_live_file_in_the_way_refused(self) -> None:
        self.archive_alpha()
        with open(os.path.join(self.data_dir, "alpha.db-wal"), "wb") as handle:
            handle.write(b"stray")
        self.refused(409, "namespace_files_present")
        with open(os.path.join(self.data_dir, "alpha.db-wal"), "rb") as handle:
            self.assertEqual(handle.read(), b"stray")

    def test_reused_name_starts_empty(self) -> None:
        manifest = self.archive_alpha()
        leased = self.fx.manager.lease("alpha")
        self.fx.settle()
        self.successResultOf(leased).release()
        self.assertNotEqual(self.fx.state.records["alpha"].id, manifest["id"])
        self.assertEqual(self.data_files(), {"alpha.db": b"", "alpha.db-wal": b""}, "a new, empty database")


class EntryNameTests(SynchronousTestCase):
    def test_parse(self) -> None:
        name, when = parse_entry_name("alpha.20261121T214513.376Z")
        self.assertEqual(name, "alpha")
        self.assertAlmostEqual(when % 60, 13.376, places=3)
        self.assertEqual(parse_entry_name("a-b.20261121T214513.376Z-3")[0], "a-b")
        for bad in ("alpha", "alpha.", "../alpha.20261121T214513.376Z", "Alpha.20261121T214513.376Z",
                    ".staging-alpha.20261121T214513.376Z", "alpha.20261121T214513.376Z/x"):
            with self.assertRaises(ValueError, msg=bad):
                parse_entry_name(bad)
