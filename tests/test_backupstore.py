"""Retention per incarnation, and the local layout read back (old files included)."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from turso_twisted.backupstore import LocalStore, StoredBackup, beyond_retention

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
