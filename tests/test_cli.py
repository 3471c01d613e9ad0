"""
turso-server-admin against the real daemon.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase

from turso_twisted.cli import rebalance_plan

from .daemon import Daemon, run_replica
from .test_e2e import E2ETestCase

CLI = os.path.join(os.path.dirname(sys.executable), "turso-server-admin")


class CLITests(E2ETestCase):
    @inlineCallbacks
    def cli(self, daemon: Daemon | None, *args: str, token: str = "admin-token") -> Any:
        env = {"PATH": os.environ.get("PATH", ""), "TURSO_SERVER_ADMIN_TOKEN": token,
               "TURSO_SERVER_ADMIN_URL": daemon.admin_url() if daemon else "http://127.0.0.1:9"}
        out, err, code = yield getProcessOutputAndValue(CLI, args, env=env)
        return out.decode(), err.decode(), code

    @inlineCallbacks
    def test_namespace_commands(self) -> Any:
        daemon = yield Daemon(self, TURSO_ADMIN_TOKEN="admin-token").start()
        out, err, code = yield self.cli(daemon, "create", "alpha")
        self.assertEqual(code, 0, err)
        self.assertIn("origin", out)
        out, err, code = yield self.cli(daemon, "ttl", "alpha", "30d")
        self.assertEqual(code, 0, err)
        self.assertIn("720h0m0s", out)
        out, err, code = yield self.cli(daemon, "list")
        self.assertEqual(out.splitlines()[0].split()[:3], ["NAME", "ORIGIN", "LOCKED"])
        self.assertEqual(out.splitlines()[1].split()[:3], ["alpha", "explicit", "true"])
        # Options go before or after the command; nested values read as key=value.
        for args in (("list", "--json"), ("--json", "list"), ("list", "-o", "json"),
                     ("--output", "json", "list")):
            out, err, code = yield self.cli(daemon, *args)
            listed = [entry["name"] for entry in json.loads(out)["namespaces"]]
            self.assertEqual((code, listed), (0, ["alpha"]), args)
        out, err, code = yield self.cli(daemon, "--json", "list", "--output", "table")  # the last one counts
        self.assertEqual(out.splitlines()[0].split()[:2], ["NAME", "ORIGIN"])
        out, err, code = yield self.cli(None, "list", "--url", daemon.admin_url())
        self.assertEqual(code, 0, err)
        out, err, code = yield self.cli(daemon, "stats", "alpha")
        files = next(line for line in out.splitlines() if line.startswith("files "))
        self.assertRegex(files, r"^files\s+alpha\.db=\d+")
        self.assertNotIn("{", out)
        out, err, code = yield self.cli(daemon, "--json", "show", "alpha")
        self.assertEqual(json.loads(out)["ttl"], "720h0m0s")
        out, err, code = yield self.cli(daemon, "show", "ghost")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err.strip(),
                         "turso-server-admin: namespace_not_found: namespace 'ghost' does not exist")
        out, err, code = yield self.cli(daemon, "list", token="wrong")
        self.assertEqual(code, 1)
        self.assertIn("unauthorized", err)
        out, err, code = yield self.cli(None, "list")
        self.assertEqual(code, 3)
        self.assertIn("cannot reach", err)
        out, err, code = yield self.cli(daemon, "frobnicate")
        self.assertEqual(code, 2)
        out, err, code = yield self.cli(daemon, "delete", "alpha")
        self.assertEqual(code, 0, err)
        out, err, code = yield self.cli(daemon, "archive")
        self.assertIn("alpha", out)
        out, err, code = yield self.cli(daemon, "unarchive", "alpha", "--unlocked")
        self.assertEqual(code, 0, err)

    @inlineCallbacks
    def test_backup_all_keep_and_restore(self) -> Any:
        daemon = yield Daemon(self, TURSO_ADMIN_TOKEN="admin-token").start()
        for name in ("alpha", "beta"):
            replica = yield self.replica(daemon, name)
            yield run_replica(replica.run, "create table t (x)", f"insert into t values ('{name}')")
            yield run_replica(replica.push)
        dest = os.path.abspath(self.mktemp())
        for _ in range(3):
            out, err, code = yield self.cli(daemon, "backup-all", "--dest", dest, "--keep", "2")
            self.assertEqual(code, 0, err)
        self.assertIn("2 of 2 namespaces backed up", out)
        for name in ("alpha", "beta"):
            # One folder per incarnation (the namespace id), the newest two kept in it.
            [incarnation] = os.listdir(os.path.join(dest, name))
            self.assertRegex(incarnation, r"^[0-9a-f]{32}$")
            files = sorted(os.listdir(os.path.join(dest, name, incarnation)))
            self.assertEqual(len(files), 2, files)
            self.assertTrue(all(f.startswith(name + ".") and f.endswith(".db") for f in files))
        self.assertEqual(sorted(os.listdir(dest)), ["alpha", "beta"])  # no scratch left behind
        out, err, code = yield self.cli(daemon, "--json", "backup-all", "--dest", dest)
        summary = json.loads(out)
        for result in summary["backups"]:
            with open(result["file"], "rb") as handle:
                self.assertEqual(hashlib.sha256(handle.read()).hexdigest(), result["sha256"])

        folder = os.path.join(dest, "alpha", os.listdir(os.path.join(dest, "alpha"))[0])
        newest = os.path.join(folder, sorted(os.listdir(folder))[-1])
        out, err, code = yield self.cli(daemon, "restore", "beta", newest)
        self.assertEqual(code, 1)
        self.assertIn("backup_of_another_namespace", err)
        out, err, code = yield self.cli(daemon, "restore", "beta", newest, "--source", "alpha")
        self.assertEqual(code, 0, err)
        reader = yield self.replica(daemon, "beta")
        self.assertEqual((yield run_replica(reader.rows, "select x from t")), [("alpha",)])

    @inlineCallbacks
    def test_backup_all_reports_failures(self) -> Any:
        daemon = yield Daemon(self, TURSO_ADMIN_TOKEN="admin-token").start()
        yield self.cli(daemon, "create", "good")
        yield self.cli(daemon, "create", "broken")
        out, err, code = yield self.cli(daemon, "--json", "show", "broken")
        os.kill(json.loads(out)["pid"], 9)
        os.unlink(os.path.join(daemon.data_dir, "broken.db"))
        dest = os.path.abspath(self.mktemp())
        out, err, code = yield self.cli(daemon, "backup-all", "--dest", dest)
        self.assertEqual(code, 1)
        self.assertIn("broken: FAILED: namespace_data_missing", out)
        self.assertIn("1 of 2 namespaces backed up", out)
        self.assertIn("backup failed for broken", err)
        [incarnation] = os.listdir(os.path.join(dest, "good"))
        self.assertEqual(len(os.listdir(os.path.join(dest, "good", incarnation))), 1)
        self.assertEqual(sorted(os.listdir(dest)), ["good"])


class CompletionTests(E2ETestCase):
    @inlineCallbacks
    def test_shell_completion(self) -> Any:
        """What `eval "$(register-python-argcomplete turso-server-admin)"` asks the CLI for."""
        answer = os.path.abspath(self.mktemp())
        line = "turso-server-admin backup"
        env = {"PATH": os.environ.get("PATH", ""), "_ARGCOMPLETE": "1", "COMP_LINE": line,
               "COMP_POINT": str(len(line)), "_ARGCOMPLETE_STDOUT_FILENAME": answer, "_ARGCOMPLETE_IFS": "\n"}
        out, err, code = yield getProcessOutputAndValue(CLI, [], env=env)
        self.assertEqual(code, 0, err)
        with open(answer) as handle:
            self.assertEqual(sorted(handle.read().split()), ["backup", "backup-all"])


class TokenCLITests(E2ETestCase):
    cli = CLITests.cli

    @inlineCallbacks
    def test_keygen_token_config_and_revoke(self) -> Any:
        keys = os.path.abspath(self.mktemp())
        out, err, code = yield self.cli(None, "keygen", "--out", keys)
        self.assertEqual(code, 0, err)
        private = os.path.join(keys, "jwt-private.pem")
        self.assertEqual(os.stat(private).st_mode & 0o777, 0o600)
        out, err, code = yield self.cli(None, "keygen", "--out", keys)
        self.assertEqual(code, 1, "an existing key is never overwritten")
        daemon = yield Daemon(self, TURSO_ADMIN_TOKEN="admin-token",
                              TURSO_JWT_KEY_FILE=os.path.join(keys, "jwt-public.pem")).start()
        out, err, code = yield self.cli(None, "--json", "token", "--key", private, "--namespace", "alpha",
                                        "--read-only", "--expires", "1h")
        self.assertEqual(code, 0, err)
        minted = json.loads(out)
        self.assertEqual(minted["claims"]["p"], {"ro": {"ns": ["alpha"]}})
        self.assertEqual(minted["claims"]["exp"] - minted["claims"]["iat"], 3600)
        out, err, code = yield self.cli(daemon, "create", "alpha")
        self.assertEqual(code, 0, err)
        out, err, code = yield self.cli(daemon, "config", "set", "alpha", "block_writes=true",
                                        "block_reason=123", "max_db_size=100MB")
        self.assertEqual(code, 0, err)
        out, err, code = yield self.cli(daemon, "--json", "config", "get", "alpha")
        config = json.loads(out)
        self.assertEqual((config["block_writes"], config["block_reason"], config["max_db_size"]),
                         (True, "123", 100_000_000))
        out, err, code = yield self.cli(daemon, "config", "set", "alpha", "nonsense=1")
        self.assertEqual(code, 1)
        self.assertIn("invalid_config", err)
        out, err, code = yield self.cli(daemon, "--json", "revoke-tokens", "alpha")
        self.assertEqual(code, 0, err)
        self.assertIsNotNone(json.loads(out)["tokens_not_before"])


class RebalancePlanTests(SynchronousTestCase):
    def test_evens_out_to_within_one(self) -> None:
        placements = {f"n{i}": "a" for i in range(6)} | {"x": "gone"}
        plan = rebalance_plan(placements, ["a", "b", "c", "d"])
        self.assertEqual(len(plan), 4)
        after = dict(placements)
        for name, source, target in plan:
            self.assertEqual(after[name], source)
            after[name] = target
        counts = sorted(list(after.values()).count(node) for node in "abcd")
        self.assertEqual(counts, [1, 1, 2, 2])
        self.assertEqual(after["x"], "gone")  # a node that is not live keeps its names

    def test_balanced_or_empty_plans_nothing(self) -> None:
        self.assertEqual(rebalance_plan({"p": "a", "q": "b", "r": "a"}, ["a", "b"]), [])
        self.assertEqual(rebalance_plan({}, ["a"]), [])
        self.assertEqual(rebalance_plan({"p": "a"}, []), [])

    def test_by_bytes_moves_what_narrows_the_gap(self) -> None:
        sizes = {"big": 900, "mid": 300, "s1": 100, "s2": 100, "t": 50}
        placements = {"big": "a", "mid": "a", "s1": "a", "s2": "a", "t": "b"}
        plan = rebalance_plan(placements, ["a", "b"], sizes=sizes)
        load = {"a": 1400, "b": 50}
        for name, source, target in plan:
            load[source] -= sizes[name]
            load[target] += sizes[name]
        # 900 comes closest to halving the gap of 1350; then 50 back narrows 450 to 350.
        self.assertEqual(plan, [("big", "a", "b"), ("t", "b", "a")])
        self.assertEqual(load, {"a": 550, "b": 900})

    def test_by_bytes_never_moves_a_name_bigger_than_the_gap(self) -> None:
        self.assertEqual(rebalance_plan({"huge": "a"}, ["a", "b"], sizes={"huge": 10}), [])
        self.assertEqual(rebalance_plan({"p": "a", "q": "b"}, ["a", "b"], sizes={"p": 5, "q": 4}), [])

    def test_drain_by_bytes_sends_the_largest_first_to_the_emptiest(self) -> None:
        plan = rebalance_plan({"p": "a", "q": "a", "r": "b", "s": "c"}, ["a", "b", "c"], drain=["a"],
                              sizes={"p": 10, "q": 100, "r": 50, "s": 60})
        self.assertEqual(plan[:2], [("q", "a", "b"), ("p", "a", "c")])

    def test_drain_moves_everything_off(self) -> None:
        placements = {"p": "a", "q": "a", "r": "b", "s": "c"}
        plan = rebalance_plan(placements, ["a", "b", "c"], drain=["a"])
        self.assertEqual(sorted((name, source) for name, source, _ in plan), [("p", "a"), ("q", "a")])
        self.assertEqual({target for _, _, target in plan}, {"b", "c"})

