"""
Namespace names: the regex, raw bytes, and paths that stay in the data dir.
"""

from __future__ import annotations

import os
import re

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from turso_twisted import names

valid_names = st.from_regex(r"\A[a-z0-9][a-z0-9_-]{0,62}\Z")


class NameTests(SynchronousTestCase):
    @given(valid_names)
    def test_valid_names_pass_as_text_and_bytes(self, name: str) -> None:
        self.assertEqual(names.validate(name), name)
        self.assertEqual(names.validate(name.encode()), name)

    @given(st.text(max_size=80))
    def test_validation_is_exactly_the_regex(self, text: str) -> None:
        expected = re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", text) is not None and "\n" not in text
        self.assertEqual(names.is_valid(text), expected)

    @given(st.binary(max_size=80))
    def test_bytes_validation_is_exactly_the_regex(self, raw: bytes) -> None:
        expected = re.fullmatch(rb"[a-z0-9][a-z0-9_-]{0,62}", raw) is not None
        self.assertEqual(names.is_valid(raw), expected)

    def test_tricks_are_rejected(self) -> None:
        for bad in ("", "..", ".", "a.b", "a/b", "%2e%2e", "Alpha", "_state", "-a", "é", "a\x00",
                    "a" * 64, "a b", "a\n", "ａ"):
            self.assertFalse(names.is_valid(bad), bad)
        self.assertTrue(names.is_valid("a" * 63))

    def test_reserved_prefix_message(self) -> None:
        with self.assertRaises(names.InvalidName) as caught:
            names.validate("_state")
        self.assertIn("reserved", str(caught.exception))

    @given(valid_names)
    def test_files_stay_in_the_data_dir(self, name: str) -> None:
        data_dir = "/var/lib/turso"
        for path in names.data_files(data_dir, name):
            self.assertEqual(os.path.dirname(os.path.normpath(path)), data_dir)
            self.assertTrue(os.path.basename(path).startswith(name + ".db"))

    def test_data_files_refuses_invalid(self) -> None:
        with self.assertRaises(names.InvalidName):
            names.data_files("/d", "../x")
