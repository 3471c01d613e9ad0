"""
What the daemon makes of a child's refusal of its own statements.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from turso_twisted.hrana import ChildSQLError


class ChildSQLErrorTests(SynchronousTestCase):
    def test_out_of_space_is_told_from_other_failures(self) -> None:
        # tursodb 0.6.0's words on a full tmpfs (seen by the soak), SQLite's, the OS's.
        for text in ("I/O error (pwrite): no storage space", "database or disk is full",
                     "[Errno 28] No space left on device"):
            self.assertTrue(ChildSQLError(text).out_of_space, text)
        for text in ("no such table: t", "I/O error (pwrite): permission denied"):
            self.assertFalse(ChildSQLError(text).out_of_space, text)
