"""
The lifecycle manager: one child per name under concurrency, leases and
drains, caps, create/delete, and start-up reconciliation.
"""

from __future__ import annotations

import json
import os

from twisted.trial.unittest import SynchronousTestCase

from turso_twisted.archive import UNARCHIVING_PREFIX, Archiver
from turso_twisted.errors import Refusal, status_for
from turso_twisted.files import move_no_clobber, sha256_and_size
from turso_twisted.state import NamespaceRecord

from .fakes import end
from .support import ManagerFixture


class LeaseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fx = ManagerFixture(self.mktemp(), auto_serve=False)
        self.manager = self.fx.manager

    def test_concurrent_first_requests_spawn_one_child(self) -> None:
        leases = [self.manager.lease("alpha") for _ in range(20)]
        self.fx.reactor.advance(0.01)
        self.assertEqual(len(self.fx.children("alpha")), 1)
        self.fx.serving.add(self.fx.children("alpha")[0].pid)
        self.fx.settle()
        results = [self.successResultOf(lease) for lease in leases]
        self.assertEqual({lease.child.port for lease in results}, {9000})
        self.assertEqual(len(self.fx.children("alpha")), 1)
        self.assertEqual(self.fx.leases.count("alpha"), 20)
        record = self.fx.state.records["alpha"]
        self.assertEqual((record.origin, record.locked), ("auto", False))

    def test_auto_provision_off_gives_404_and_creates_nothing(self) -> None:
        fx = ManagerFixture(self.mktemp(), allow_auto_provision=False)
        failure = self.failureResultOf(fx.manager.lease("alpha"), Refusal)
        self.assertEqual(status_for(failure.value), 404)
        self.assertEqual(fx.state.records, {})
        self.assertEqual(fx.reactor.spawned, [])

    def test_cap_gives_503_on_data_and_409_on_create(self) -> None:
        fx = ManagerFixture(self.mktemp(), max_namespaces=1)
        fx.manager.lease("alpha")
        fx.settle()
        failure = self.failureResultOf(fx.manager.lease("beta"), Refusal)
        self.assertEqual((status_for(failure.value, "data"), failure.value.code), (503, "namespace_limit"))
        failure = self.failureResultOf(fx.manager.create("beta"), Refusal)
        self.assertEqual(status_for(failure.value), 409)
        self.assertEqual(list(fx.state.records), ["alpha"])
        # Existing names still work at the cap.
        self.successResultOf(fx.manager.lease("alpha"))

    def test_delete_waits_for_leases(self) -> None:
        fx = ManagerFixture(self.mktemp())
        leased = fx.manager.lease("alpha")
        fx.settle()
        lease = self.successResultOf(leased)
        deleted = fx.archival.delete("alpha")
        fx.reactor.advance(1)
        self.assertEqual(lease.child.process.transport.signals, [])
        # A request arriving meanwhile waits for the lock.
        late = fx.manager.lease("alpha")
        self.assertNoResult(late)
        lease.release()
        self.assertEqual(lease.child.process.transport.signals, ["TERM"])
        end(lease.child.process, signal=15)
        manifest = self.successResultOf(deleted)
        self.assertEqual(manifest["name"], "alpha")
        # ...and then sees a new, empty incarnation.
        fx.settle()
        new_lease = self.successResultOf(late)
        self.assertNotEqual(fx.state.records["alpha"].id, manifest["id"])
        self.assertIsNot(new_lease.child, lease.child)

    def test_no_new_leases_while_stopping(self) -> None:
        fx = ManagerFixture(self.mktemp())
        fx.admission.stopping = True
        failure = self.failureResultOf(fx.manager.lease("alpha"), Refusal)
        self.assertEqual((status_for(failure.value), failure.value.code), (503, "shutting_down"))
        self.assertEqual(self.failureResultOf(fx.manager.create("beta"), Refusal).value.code,
                         "shutting_down")
        self.assertEqual((fx.state.records, fx.reactor.spawned), ({}, []))

    def test_failed_auto_provision_leaves_no_record(self) -> None:
        fx = ManagerFixture(self.mktemp(), auto_serve=False)
        leased = fx.manager.lease("alpha")
        fx.reactor.advance(0.01)
        end(fx.children("alpha")[0], code=1)
        fx.reactor.advance(0.01)
        self.assertEqual(status_for(self.failureResultOf(leased, Refusal).value), 503)
        self.assertEqual(fx.state.records, {})
        self.assertFalse(os.path.exists(os.path.join(fx.data_dir, "alpha.db")))

    def test_new_namespace_never_starts_over_stray_files(self) -> None:
        fx = ManagerFixture(self.mktemp())
        with open(os.path.join(fx.data_dir, "alpha.db-wal"), "wb") as handle:
            handle.write(b"someone's frames")
        failure = self.failureResultOf(fx.manager.lease("alpha"), Refusal)
        self.assertEqual((status_for(failure.value), failure.value.code), (503, "namespace_files_present"))
        self.assertEqual((fx.state.records, fx.reactor.spawned), ({}, []))
        with open(os.path.join(fx.data_dir, "alpha.db-wal"), "rb") as handle:
            self.assertEqual(handle.read(), b"someone's frames")

    def test_drain_all_waits_for_every_lease(self) -> None:
        fx = ManagerFixture(self.mktemp())
        first, second = fx.manager.lease("alpha"), fx.manager.lease("beta")
        fx.settle()
        leases = [self.successResultOf(first), self.successResultOf(second)]
        drained = fx.leases.all_drained()
        leases[0].release()
        self.assertNoResult(drained)
        leases[1].release()
        self.successResultOf(drained)
        self.successResultOf(fx.leases.all_drained())

    def test_drain_is_bounded(self) -> None:
        fx = ManagerFixture(self.mktemp())
        leased = fx.manager.lease("alpha")
        fx.settle()
        lease = self.successResultOf(leased)
        deleted = fx.archival.delete("alpha")
        fx.reactor.advance(10)
        self.assertEqual(lease.child.process.transport.signals, ["TERM"])
        end(lease.child.process, signal=15)
        self.successResultOf(deleted)
        lease.release()
        self.assertEqual(fx.leases.count(), 0)


class AdminOperationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fx = ManagerFixture(self.mktemp())
        self.manager = self.fx.manager

    def create(self, name: str) -> tuple[NamespaceRecord, bool]:
        created = self.manager.create(name)
        self.fx.settle()
        return self.successResultOf(created)

    def test_create_is_idempotent(self) -> None:
        record, created = self.create("alpha")
        self.assertTrue(created)
        self.assertEqual((record.origin, record.locked), ("explicit", True))
        again, created = self.create("alpha")
        self.assertFalse(created)
        self.assertIs(again, record)
        self.assertEqual(len(self.fx.reactor.spawned), 1)

    def test_create_that_cannot_start_changes_nothing(self) -> None:
        self.fx.auto_serve = False
        created = self.manager.create("alpha")
        self.fx.reactor.advance(0.01)
        # The child made its empty files, then died.
        open(os.path.join(self.fx.data_dir, "alpha.db-wal"), "wb").close()
        end(self.fx.children("alpha")[0], code=1)
        self.fx.reactor.advance(0.01)
        self.assertEqual(status_for(self.failureResultOf(created, Refusal).value), 503)
        self.assertEqual(self.fx.state.records, {})
        self.assertEqual(sorted(os.listdir(self.fx.data_dir)), ["_state", "_tmp"])
        self.assertEqual(os.listdir(os.path.join(self.fx.data_dir, "_tmp")), [])

    def test_delete_moves_files_with_manifest(self) -> None:
        self.create("alpha")
        db = os.path.join(self.fx.data_dir, "alpha.db")
        with open(db, "wb") as handle:
            handle.write(b"alpha data")
        with open(db + "-wal", "wb") as handle:
            handle.write(b"wal")
        deleted = self.fx.archival.delete("alpha")
        end(self.fx.children("alpha")[0], signal=15)
        manifest = self.successResultOf(deleted)
        self.assertFalse(os.path.exists(db))
        entry = os.path.join(self.fx.data_dir, "archive", manifest["entry"])
        self.assertTrue(manifest["entry"].startswith("alpha."))
        with open(os.path.join(entry, "manifest.json")) as handle:
            self.assertEqual(json.load(handle), manifest)
        files = {f["name"]: f for f in manifest["files"]}
        self.assertEqual(sorted(files), ["alpha.db", "alpha.db-wal"])
        self.assertEqual(files["alpha.db"]["sha256"], sha256_and_size(os.path.join(entry, "alpha.db"))[0])
        self.assertEqual(files["alpha.db"]["size"], 10)
        self.assertNotIn("alpha", self.fx.state.records)

    def test_create_makes_an_auto_namespace_explicit(self) -> None:
        leased = self.manager.lease("alpha")
        self.fx.settle()
        self.successResultOf(leased).release()
        record, created = self.create("alpha")
        self.assertFalse(created)
        self.assertEqual((record.origin, record.locked), ("explicit", True))
        self.assertEqual(self.fx.state.records["alpha"].origin, "explicit")

    def test_missing_data_file_is_refused(self) -> None:
        self.create("alpha")
        child = self.fx.children("alpha")[0]
        end(child, signal=9)
        os.unlink(os.path.join(self.fx.data_dir, "alpha.db"))
        failure = self.failureResultOf(self.manager.lease("alpha"), Refusal)
        self.assertEqual((status_for(failure.value), failure.value.code), (503, "namespace_data_missing"))
        self.assertEqual(len(self.fx.children("alpha")), 1, "no child started over nothing")

    def test_failed_save_leaves_memory_as_on_disk(self) -> None:
        self.create("alpha")

        def broken_save() -> None:
            raise OSError("disk full")

        real = type(self.fx.state).save
        self.patch(type(self.fx.state), "save", lambda store: broken_save())
        self.failureResultOf(self.manager.update("alpha", lambda r: setattr(r, "locked", False)), OSError)
        self.assertTrue(self.fx.state.records["alpha"].locked)
        self.patch(type(self.fx.state), "save", real)

    def test_delete_unknown_is_404(self) -> None:
        failure = self.failureResultOf(self.fx.archival.delete("ghost"), Refusal)
        self.assertEqual(status_for(failure.value), 404)

    def test_two_archives_of_one_name_in_one_millisecond(self) -> None:
        for _ in range(2):
            self.create("alpha")
            deleted = self.fx.archival.delete("alpha")
            end(self.fx.children("alpha")[-1], signal=15)
            self.successResultOf(deleted)
        self.assertEqual(len(os.listdir(os.path.join(self.fx.data_dir, "archive"))), 2)


class ReconcileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.data_dir = self.mktemp()
        self.fx = ManagerFixture(self.data_dir)

    def write(self, name: str, content: bytes = b"x") -> None:
        with open(os.path.join(self.data_dir, name), "wb") as handle:
            handle.write(content)

    def test_files_without_records_are_quarantined_not_served(self) -> None:
        self.fx.state.records["kept"] = NamespaceRecord.new("kept", "auto", 0)
        self.write("kept.db", b"mine")
        self.write("victim.db", b"planted")
        self.write("victim.db-log", b"planted")
        self.write("stray.db-wal", b"frames")
        self.write("Bad.db")
        self.write("notes.txt")
        self.fx.reconcile()
        self.assertEqual(list(self.fx.state.records), ["kept"], "nothing adopted")
        [stamp] = os.listdir(os.path.join(self.data_dir, "_quarantine"))
        quarantine = os.path.join(self.data_dir, "_quarantine", stamp)
        self.assertEqual(sorted(os.listdir(quarantine)), ["stray.db-wal", "victim.db", "victim.db-log"])
        self.assertEqual(sorted(os.listdir(self.data_dir)),
                         ["Bad.db", "_quarantine", "_state", "kept.db", "notes.txt"])
        # The name is free: a new namespace of it starts empty, not on the planted file.
        leased = self.fx.manager.lease("victim")
        self.fx.settle()
        self.successResultOf(leased).release()
        with open(os.path.join(self.data_dir, "victim.db"), "rb") as handle:
            self.assertEqual(handle.read(), b"")

    def test_an_interrupted_install_is_dropped_or_completed(self) -> None:
        for name, main_file_in in (("forked", True), ("half", False)):
            record = NamespaceRecord.new(name, "explicit", 0)
            record.installing = True
            self.fx.state.records[name] = record
            if main_file_in:
                self.write(f"{name}.db", b"built")
            else:
                self.write(f"{name}.db-wal", b"moved before the crash")
        self.fx.reconcile()
        self.assertEqual(list(self.fx.state.records), ["forked"])
        self.assertFalse(self.fx.state.records["forked"].installing)
        [stamp] = os.listdir(os.path.join(self.data_dir, "_quarantine"))
        self.assertEqual(os.listdir(os.path.join(self.data_dir, "_quarantine", stamp)), ["half.db-wal"])

    def test_undoes_an_interrupted_archive(self) -> None:
        record = NamespaceRecord.new("alpha", "auto", 0)
        self.fx.state.records["alpha"] = record
        self.write("alpha.db", b"alpha")
        self.write("alpha.db-wal", b"wal")
        staging = os.path.join(self.data_dir, "archive", ".staging-alpha.20260101T000000.000Z")
        os.makedirs(staging)
        move_no_clobber(os.path.join(self.data_dir, "alpha.db"), os.path.join(staging, "alpha.db"))
        self.fx.reconcile()
        self.assertEqual(os.listdir(os.path.join(self.data_dir, "archive")), [])
        with open(os.path.join(self.data_dir, "alpha.db"), "rb") as handle:
            self.assertEqual(handle.read(), b"alpha")
        self.assertIn("alpha", self.fx.state.records)

    def test_completes_an_archive_whose_state_was_not_saved(self) -> None:
        record = NamespaceRecord.new("alpha", "auto", 0)
        record.clients = {"replica-1"}
        self.fx.state.records["alpha"] = record
        self.write("alpha.db", b"alpha")
        archiver = Archiver(self.data_dir, run_in_thread=lambda f, *a: f(*a))
        record.archiving = archiver.new_entry_name("alpha", 5)
        self.fx.state.save()
        archived = archiver.archive(record, "test", 5, record.archiving)
        self.assertFalse(os.path.exists(os.path.join(self.data_dir, "alpha.db")))
        self.fx.reconcile()
        self.assertEqual(self.fx.state.records, {})
        self.assertEqual(self.fx.state.tombstones, {"alpha": {"replica-1"}})
        self.assertEqual(archived["id"], record.id)

    def test_missing_files_with_an_archive_of_the_same_id_are_not_an_archive(self) -> None:
        """
        After an unarchive or a restore, the live record and an archive
        entry share an id: a namespace whose files then vanish stays live
        (and is refused as missing), it is not taken for an archived one.
        """
        record = NamespaceRecord.new("alpha", "auto", 0)
        self.fx.state.records["alpha"] = record
        self.write("alpha.db", b"old")
        archiver = Archiver(self.data_dir, run_in_thread=lambda f, *a: f(*a))
        archiver.archive(record, "test", 5, archiver.new_entry_name("alpha", 5))
        self.fx.reconcile()
        self.assertIn("alpha", self.fx.state.records)

    def test_archive_of_an_older_incarnation_is_left_alone(self) -> None:
        old = NamespaceRecord.new("alpha", "auto", 0)
        self.write("alpha.db", b"old")
        archiver = Archiver(self.data_dir, run_in_thread=lambda f, *a: f(*a))
        archiver.archive(old, "test", 5, archiver.new_entry_name("alpha", 5))
        self.fx.state.records["alpha"] = NamespaceRecord.new("alpha", "auto", 10)
        self.fx.reconcile()
        self.assertIn("alpha", self.fx.state.records)

    def test_undo_survives_a_crash_between_link_and_unlink(self) -> None:
        self.fx.state.records["arc"] = NamespaceRecord.new("arc", "auto", 0)
        staging = os.path.join(self.data_dir, "archive", ".staging-arc.20260101T000000.000Z")
        os.makedirs(staging)
        for suffix, content in ((".db", b"main"), (".db-wal", b"wal")):
            with open(os.path.join(staging, "arc" + suffix), "wb") as handle:
                handle.write(content)
        # The last move got as far as the link: the file is in both places.
        with open(os.path.join(staging, "arc.db-log"), "wb") as handle:
            handle.write(b"log")
        os.link(os.path.join(staging, "arc.db-log"), os.path.join(self.data_dir, "arc.db-log"))
        self.fx.reconcile()
        for suffix, content in ((".db", b"main"), (".db-wal", b"wal"), (".db-log", b"log")):
            with open(os.path.join(self.data_dir, "arc" + suffix), "rb") as handle:
                self.assertEqual(handle.read(), content)
        self.assertEqual(os.listdir(os.path.join(self.data_dir, "archive")), [])

    def test_undo_of_an_unarchive_survives_a_half_done_move(self) -> None:
        # Both the prefix of this version and the one of earlier versions.
        for prefix in (UNARCHIVING_PREFIX, ".restoring-"):
            record = NamespaceRecord.new("arc", "auto", 0)
            self.fx.state.records["arc"] = record
            self.write("arc.db", b"main")
            archiver = Archiver(self.data_dir, run_in_thread=lambda f, *a: f(*a))
            entry = archiver.new_entry_name("arc", 5)
            archiver.archive(record, "test", 5, entry)
            del self.fx.state.records["arc"]
            unarchiving = os.path.join(self.data_dir, "archive", prefix + entry)
            os.rename(os.path.join(self.data_dir, "archive", entry), unarchiving)
            # The move of the main file got as far as the link.
            os.link(os.path.join(unarchiving, "arc.db"), os.path.join(self.data_dir, "arc.db"))
            self.fx.reconcile()
            self.assertEqual(self.fx.state.records, {}, "no ghost namespace adopted")
            self.assertFalse(os.path.exists(os.path.join(self.data_dir, "arc.db")))
            self.assertIn(entry, [e.entry for e in archiver.entries("arc")])

    def test_move_never_clobbers(self) -> None:
        self.write("a", b"1")
        self.write("b", b"2")
        with self.assertRaises(FileExistsError):
            move_no_clobber(os.path.join(self.data_dir, "a"), os.path.join(self.data_dir, "b"))
        with open(os.path.join(self.data_dir, "b"), "rb") as handle:
            self.assertEqual(handle.read(), b"2")
