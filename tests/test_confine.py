"""
Confinement: choosing it, and a real tursodb confined by the real helper,
asked directly (under the gate, as a hostile statement would reach it) to
write outside its files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from turso_twisted.confine import Confinement, ConfinementUnavailable, choose
from turso_twisted.ports import PortAllocator
from turso_twisted.process import owns_listener

from .daemon import tursodb_bin, wait_for


def landlock_helper() -> str:
    """
    The helper ./dev test built, if the kernel has Landlock; else skip.
    """
    helper = shutil.which(os.environ.get("TURSO_LANDLOCK_BIN", "turso-landlock"))
    if helper is None:
        raise SkipTest("no turso-landlock helper (TURSO_LANDLOCK_BIN); run the suite with ./dev test")
    probe = subprocess.run([helper, "--probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise SkipTest(f"this kernel has no Landlock: {probe.stderr.strip()}")
    return helper


class _Child(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


class ChooseTests(SynchronousTestCase):
    def test_none_is_none(self) -> None:
        chosen = choose("none", "/no/such/helper")
        self.assertIsNone(chosen.helper)
        self.assertEqual(chosen.wrap(["/d/a.db"], ["/d/tmp"]), [])
        self.assertIn("TURSO_CONFINE=none", chosen.describe())

    def test_auto_without_the_helper_says_why(self) -> None:
        chosen = choose("auto", "/no/such/helper")
        self.assertIsNone(chosen.helper)
        self.assertIn("no such executable", chosen.describe())

    def test_required_without_the_helper_stops_start_up(self) -> None:
        with self.assertRaises(ConfinementUnavailable) as caught:
            choose("landlock", "/no/such/helper")
        self.assertIn("TURSO_CONFINE=landlock", str(caught.exception))

    def test_the_real_helper(self) -> None:
        helper = landlock_helper()
        chosen = choose("landlock", helper)
        self.assertEqual(chosen.helper, helper)
        self.assertGreaterEqual(chosen.abi, 1)
        self.assertEqual(chosen.wrap(["/d/a.db"], ["/d/tmp"]),
                         [helper, "--rw", "/d/a.db", "--rwdir", "/d/tmp", "--"])


def _running(pid: int) -> bool:
    """Whether C{pid} exists and is not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class HelperStartTests(SynchronousTestCase):
    """
    The helper does setsid's and setpriv's work (one exec instead of three):
    its command runs in the given dir, in a session of its own, and is
    killed by the kernel when its parent dies.
    """

    def test_dir_session_and_parent(self) -> None:
        helper = landlock_helper()
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        script = 'echo "$(pwd) $(cut -d" " -f6 /proc/$$/stat) $$ $(grep PDeathSig /proc/$$/status || true)"'
        done = subprocess.run([helper, "--chdir", cwd, "--parent", str(os.getpid()), "--", "/bin/sh", "-c",
                               script], capture_output=True, text=True)
        self.assertEqual(done.returncode, 0, done.stderr)
        where, session, pid = done.stdout.split()[:3]
        self.assertEqual(where, cwd)
        self.assertEqual(session, pid, "its own session")

    def test_a_parent_already_gone_starts_nothing(self) -> None:
        helper = landlock_helper()
        marker = os.path.abspath(self.mktemp())
        done = subprocess.run([helper, "--parent", "1", "--", "/bin/sh", "-c", f"touch {marker}"],
                              capture_output=True, text=True)
        self.assertEqual(done.returncode, 1)
        self.assertIn("parent 1 is gone", done.stderr)
        self.assertFalse(os.path.exists(marker))

    def test_killed_with_its_parent(self) -> None:
        helper = landlock_helper()
        # A middleman starts the helper and is then killed: the helper's
        # command must die with it (PR_SET_PDEATHSIG).
        pid_file = os.path.abspath(self.mktemp())
        middleman = subprocess.Popen([sys.executable, "-c", (
            "import os, subprocess, sys\n"
            f"p = subprocess.Popen([{helper!r}, '--parent', str(os.getpid()), '--', 'sleep', '60'])\n"
            f"open({pid_file!r}, 'w').write(str(p.pid))\n"
            "sys.stdin.read()\n")], stdin=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not (os.path.exists(pid_file) and open(pid_file).read()) and time.monotonic() < deadline:
            time.sleep(0.01)
        child = int(open(pid_file).read())
        middleman.kill()
        middleman.wait()
        deadline = time.monotonic() + 10
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.01)
        alive = _running(child)
        self.assertFalse(alive, "the helper's command outlived its parent")


class ConfinedChildTests(TestCase):
    @inlineCallbacks
    def test_a_confined_child_writes_only_its_files_and_scratch(self) -> Any:
        helper = landlock_helper()
        root = os.path.abspath(self.mktemp())
        data, scratch, cwd, elsewhere = (os.path.join(root, d) for d in ("data", "tmp", "cwd", "elsewhere"))
        for directory in (data, scratch, cwd, elsewhere):
            os.makedirs(directory)
        db = os.path.join(data, "ns.db")
        for path in (db, db + "-wal"):
            open(path, "wb").close()
        port = PortAllocator(42000, 42999).acquire()
        confinement = Confinement(helper=helper, abi=1)
        args = [*confinement.wrap([db, db + "-wal"], [scratch]), tursodb_bin(), db,
                "--sync-server", f"127.0.0.1:{port}"]
        child = _Child()
        transport = reactor.spawnProcess(child, args[0], args, env={"TMPDIR": scratch}, path=cwd,
                                         childFDs={0: "w", 1: "r", 2: "r"})

        def kill() -> Deferred[None]:
            if not child.ended.called:
                transport.signalProcess("KILL")
            return child.ended

        self.addCleanup(kill)
        yield wait_for(lambda: owns_listener(transport.pid, port), "the confined child to listen")

        @inlineCallbacks
        def run(sql: str) -> Any:
            body = {"requests": [{"type": "execute", "stmt": {"sql": sql}}]}
            response = yield treq.post(f"http://127.0.0.1:{port}/v2/pipeline", json.dumps(body).encode())
            result = json.loads((yield response.content()))["results"][0]
            return result.get("error", {}).get("message") if result["type"] == "error" else "ok"

        self.assertEqual((yield run("create table t (x)")), "ok")
        self.assertEqual((yield run("BEGIN IMMEDIATE")), "ok", "its scratch dir takes temp files")
        self.assertEqual((yield run("insert into t values (1)")), "ok")
        self.assertEqual((yield run("COMMIT")), "ok")
        before = sorted(os.listdir(data)), os.listdir(cwd), os.listdir(elsewhere)
        for target in (os.path.join(elsewhere, "planted.db"), os.path.join(data, "victim.db"), "relative.db"):
            answer = yield run(f"VACUUM INTO '{target}'")
            self.assertIn("permission denied", answer, target)
        self.assertEqual((sorted(os.listdir(data)), os.listdir(cwd), os.listdir(elsewhere)), before,
                         "no new file anywhere outside its scratch dir")
        self.assertEqual((yield run(f"VACUUM INTO '{scratch}/copy.db'")), "ok", "its scratch dir is its own")
        # The daemon never passes --experimental-attach: ATTACH stays refused
        # by tursodb itself too, under the gate.
        self.assertIn("experimental", (yield run(f"ATTACH DATABASE '{elsewhere}/x.db' AS x")))
        self.assertEqual((yield run("select x from t")), "ok")
