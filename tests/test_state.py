"""
The state file: atomic writes, the previous copy, refusing bad files, and
the access-time debounce.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel
from twisted.trial.unittest import SynchronousTestCase

from turso_twisted.nsconfig import NamespaceConfig
from turso_twisted.state import NamespaceRecord, StateError, StateStore
from turso_twisted.tokens import generate_key_pair


class StateStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.data_dir = self.mktemp()
        os.makedirs(self.data_dir)
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = StateStore.for_data_dir(self.data_dir, self.clock)
        self.store.load()

    def reload(self) -> StateStore:
        store = StateStore.for_data_dir(self.data_dir, self.clock)
        store.load()
        return store

    def test_missing_file_is_empty(self) -> None:
        self.assertEqual(self.store.records, {})
        self.assertTrue(os.path.isdir(os.path.join(self.data_dir, "_state")))

    def test_round_trip(self) -> None:
        record = NamespaceRecord.new("alpha", "auto", self.clock.seconds())
        record.ttl = 30 * 86400
        _, public = generate_key_pair()
        record.config = record.config.updated({
            "block_writes": True, "block_reason": "billing", "max_db_size": "100MB",
            "jwt_key": public.decode(), "tokens_not_before": "2026-11-23T10:00:00.123Z"})
        self.store.records["alpha"] = record
        self.store.records["beta"] = NamespaceRecord.new("beta", "explicit", self.clock.seconds())
        self.store.save()
        loaded = self.reload().records
        self.assertEqual(loaded["alpha"], record)
        self.assertTrue(loaded["beta"].locked)
        self.assertFalse(loaded["alpha"].locked)
        with open(self.store.path) as handle:
            on_disk = json.load(handle)
        self.assertEqual(on_disk["namespaces"]["alpha"]["ttl"], "720h0m0s")
        self.assertEqual(on_disk["namespaces"]["alpha"]["origin"], "auto")
        self.assertIn("createdAt", on_disk["namespaces"]["alpha"])
        self.assertIn("lastAccessAt", on_disk["namespaces"]["alpha"])
        self.assertEqual(on_disk["namespaces"]["alpha"]["config"]["max_db_size"], 100_000_000)
        self.assertEqual(on_disk["namespaces"]["alpha"]["config"]["tokens_not_before"],
                         "2026-11-23T10:00:00.123Z")
        self.assertEqual(loaded["beta"].config, NamespaceConfig())
        self.assertNotIn("config", on_disk["namespaces"]["beta"], "a default config is not written")

    def test_ids_differ_per_incarnation(self) -> None:
        first = NamespaceRecord.new("alpha", "auto", 0)
        second = NamespaceRecord.new("alpha", "auto", 0)
        self.assertTrue(first.id)
        self.assertNotEqual(first.id, second.id)

    def test_previous_copy_kept_and_no_temp_left(self) -> None:
        self.store.records["alpha"] = NamespaceRecord.new("alpha", "auto", 0)
        self.store.save()
        self.store.records["beta"] = NamespaceRecord.new("beta", "auto", 0)
        self.store.save()
        with open(self.store.previous_path) as handle:
            self.assertEqual(list(json.load(handle)["namespaces"]), ["alpha"])
        self.assertEqual(sorted(os.listdir(os.path.dirname(self.store.path))),
                         ["namespaces.json", "namespaces.json.prev"])

    def test_corrupt_file_stops_with_its_name_and_the_previous_copy(self) -> None:
        self.store.records["alpha"] = NamespaceRecord.new("alpha", "auto", 0)
        self.store.save()
        self.store.save()
        with open(self.store.path, "w") as handle:
            handle.write("{not json")
        with self.assertRaises(StateError) as caught:
            self.reload()
        self.assertIn(self.store.path, str(caught.exception))
        self.assertIn(self.store.previous_path, str(caught.exception))
        with open(self.store.previous_path) as handle:
            self.assertIn("alpha", json.load(handle)["namespaces"])

    def test_invalid_content_is_refused(self) -> None:
        for document in ({"version": 99, "namespaces": {}}, {"version": 1, "namespaces": []}, [1, 2]):
            with open(self.store.path, "w") as handle:
                json.dump(document, handle)
            with self.assertRaises(StateError):
                self.reload()

    def test_one_bad_record_is_set_aside_not_fatal(self) -> None:
        good = NamespaceRecord.new("alpha", "auto", self.clock.seconds())
        self.store.records["alpha"] = good
        self.store.save()
        with open(self.store.path) as handle:
            document = json.load(handle)
        document["namespaces"]["../x"] = {}
        document["namespaces"]["beta"] = {**good.to_json(), "ttl": "1e-05ms"}
        document["namespaces"]["gamma"] = {**good.to_json(), "origin": "weird"}
        with open(self.store.path, "w") as handle:
            json.dump(document, handle)
        store = self.reload()
        self.assertEqual(list(store.records), ["alpha"])
        self.assertEqual(store.quarantined_records, ["../x", "beta", "gamma"])
        [aside] = [f for f in os.listdir(os.path.dirname(store.path)) if f.startswith("quarantined-records-")]
        with open(os.path.join(os.path.dirname(store.path), aside)) as handle:
            kept = json.load(handle)
        self.assertEqual(kept["beta"]["record"]["ttl"], "1e-05ms", "the record is kept as it was")
        self.assertIn("not a duration", kept["beta"]["problem"])
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_missing_file_with_previous_copy_is_refused(self) -> None:
        self.store.save()
        self.store.save()
        os.unlink(self.store.path)
        with self.assertRaises(StateError) as caught:
            self.reload()
        self.assertIn("previous copy", str(caught.exception))

    def test_touch_is_debounced(self) -> None:
        self.store.records["alpha"] = NamespaceRecord.new("alpha", "auto", self.clock.seconds())
        self.store.save()
        writes = self.store.writes
        self.clock.advance(5)
        self.store.touch("alpha")
        self.clock.advance(10)
        self.store.touch("alpha")
        self.assertEqual(self.store.writes, writes)
        self.assertEqual(self.store.records["alpha"].last_access_at, self.clock.seconds())
        self.clock.advance(50)
        self.assertEqual(self.store.writes, writes + 1)
        self.assertEqual(self.reload().records["alpha"].last_access_at, self.clock.seconds() - 50)
        self.clock.advance(120)
        self.assertEqual(self.store.writes, writes + 1)

    def test_flush_on_a_full_disk_is_retried_without_a_traceback(self) -> None:
        self.store.records["alpha"] = NamespaceRecord.new("alpha", "auto", 0)
        self.store.save()
        events: list[dict[str, Any]] = []
        self.patch(StateStore, "_log", Logger(observer=events.append))
        real_save = StateStore.save

        def full(store: StateStore) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(StateStore, "save", full)
        self.clock.advance(5)
        touched_at = self.clock.seconds()
        self.store.touch("alpha")
        self.clock.advance(60)
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertNotIn("log_failure", event)
        self.assertIn("No space left", event["error"])
        self.patch(StateStore, "save", real_save)
        self.clock.advance(60)
        self.assertEqual(self.reload().records["alpha"].last_access_at, touched_at, "retried")

    def test_a_config_change_alone_is_written_and_revocations_outlive_the_record(self) -> None:
        record = NamespaceRecord.new("alpha", "auto", 0)
        self.store.records["alpha"] = record
        self.store.save()
        record.config = record.config.updated({"block_writes": True})
        self.store.token_floors["alpha"] = 1000.5
        self.store.save()
        loaded = self.reload()
        self.assertTrue(loaded.records["alpha"].config.block_writes, "not a stale cached line")
        del self.store.records["alpha"]
        self.store.save()
        self.assertEqual(self.reload().tokens_not_before("alpha"), 1000.5)

    def test_save_cancels_the_pending_flush(self) -> None:
        self.store.records["alpha"] = NamespaceRecord.new("alpha", "auto", 0)
        self.store.touch("alpha")
        self.store.save()
        writes = self.store.writes
        self.clock.advance(61)
        self.assertEqual(self.store.writes, writes)

    def test_flush_pending(self) -> None:
        self.store.records["alpha"] = NamespaceRecord.new("alpha", "auto", 0)
        self.store.flush_pending()
        self.assertEqual(self.store.writes, 0)
        self.store.touch("alpha")
        self.store.flush_pending()
        self.assertEqual(self.store.writes, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
