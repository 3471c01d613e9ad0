"""Retention per incarnation, and the local layout read back (old files included)."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from turso_twisted.backupstore import LocalStore, StoredBackup, StoreError, beyond_retention

OLD, NEW = "a" * 32, "b" * 32


def backup(name: str, namespace_id: str, taken: str) -> StoredBackup:
    return StoredBackup(taken, name, namespace_id, f"{name}.{taken}.db", f"/{name}/{namespace_id}/{taken}")


class RetentionTests(SynchronousTestCase):
    def test_newest_kept_per_incarnation(self) -> None:
        kept = [backup("n", OLD, "20261101T000000.000Z"), backup("n", OLD, "20261102T000000.000Z"),
                backup("n", NEW, "20261103T000000.000Z"), backup("n", NEW, "20261104T000000.000Z"),
                backup("n", NEW, "20261105T000000.000Z"), backup("m", NEW, "20261101T000000.000Z")]
        doomed = beyond_retention(kept, 1)
        self.assertEqual(sorted(b.taken for b in doomed),
                         ["20261101T000000.000Z", "20261103T000000.000Z", "20261104T000000.000Z"])
        self.assertNotIn(kept[-1], doomed)  # another name's only backup
        self.assertEqual(beyond_retention(kept, 0), [])


class LocalStoreTests(SynchronousTestCase):
    def test_layout_read_back(self) -> None:
        root = os.path.abspath(self.mktemp())
        for path in (f"n/{OLD}/n.20261101T000000.000Z.db", "n/n.20261001T000000.000Z.db",
                     f"n/{NEW}/n.20261102T000000.000Z.db", f"n/{NEW}/n.20261102T000000.000Z.db.partial",
                     f"n/{NEW}/other.20261102T000000.000Z.db", ".incoming/n.20261103T000000.000Z.db",
                     "n/not-an-id/n.20261104T000000.000Z.db"):
            os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
            open(os.path.join(root, path), "wb").close()
        found = LocalStore(root).backups()
        self.assertEqual([(b.namespace_id, b.taken) for b in found],
                         [("", "20261001T000000.000Z"), (OLD, "20261101T000000.000Z"),
                          (NEW, "20261102T000000.000Z")])
        self.assertEqual(LocalStore(os.path.join(root, "missing")).backups(), [])


class _Store:
    """Backups whose fetch fails as told."""

    def __init__(self, failures: dict[str, StoreError]) -> None:
        self.failures, self.fetched = failures, []  # type: ignore[var-annotated]

    def fetch(self, stored: StoredBackup, path: str) -> str:
        self.fetched.append(stored.taken)
        if stored.taken in self.failures:
            raise self.failures[stored.taken]
        open(path, "wb").close()
        return ""


class _Client:
    def __init__(self) -> None:
        self.uploaded: list[str] = []

    def upload(self, path: str, local: str) -> dict[str, str]:
        self.uploaded.append(os.path.basename(local))
        return {"id": "restored"}


class RestoreNewestTests(SynchronousTestCase):
    """restore-all's choice: the newest incarnation only; damage gives way, an outage does not."""

    backups = [backup("n", OLD, "20261101T000000.000Z"), backup("n", NEW, "20261102T000000.000Z"),
               backup("n", NEW, "20261103T000000.000Z")]

    def restore(self, store: _Store, live: dict[str, dict[str, str]] | None = None) -> dict[str, object]:
        from turso_twisted.cli import _restore_newest

        scratch = os.path.abspath(self.mktemp())
        os.makedirs(scratch)
        return _restore_newest(_Client(), store, "n", self.backups, live or {}, scratch)  # type: ignore[arg-type]

    def test_damaged_newest_gives_way_within_its_incarnation_only(self) -> None:
        store = _Store({"20261103T000000.000Z": StoreError("bad sum", damaged=True)})
        outcome = self.restore(store)
        self.assertEqual((outcome["outcome"], store.fetched), ("restored", ["20261103T000000.000Z",
                                                                          "20261102T000000.000Z"]))
        store = _Store({taken: StoreError("bad sum", damaged=True)
                        for taken in ("20261103T000000.000Z", "20261102T000000.000Z")})
        outcome = self.restore(store)
        self.assertEqual(outcome["outcome"], "refused")  # never the other tenant's backup
        self.assertNotIn("20261101T000000.000Z", store.fetched)

    def test_an_outage_is_refused_not_worked_around(self) -> None:
        store = _Store({"20261103T000000.000Z": StoreError("timed out")})
        outcome = self.restore(store)
        self.assertEqual((outcome["outcome"], store.fetched), ("refused", ["20261103T000000.000Z"]))

    def test_live_names(self) -> None:
        self.assertEqual(self.restore(_Store({}), {"n": {"origin": "explicit"}})["outcome"], "skipped")
        self.assertEqual(self.restore(_Store({}), {"n": {"origin": "auto"}})["outcome"], "refused")
