"""
The supervisor with a recording reactor: readiness, timeouts, taken ports,
crash backoff and the stop sequence.
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import SynchronousTestCase

from turso_twisted.confine import Confinement
from turso_twisted.errors import Refusal, status_for
from turso_twisted.ports import PortAllocator, PortsExhausted
from turso_twisted.process import TursodbProcess, child_environment, child_wrappers
from turso_twisted.supervisor import MAX_BACKOFF, Supervisor

from .fakes import ProcessReactor, end


class SupervisorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ProcessReactor()
        self.serving: set[int] = set()
        self.data_dir = os.path.abspath(self.mktemp())
        self.supervisor = Supervisor(
            reactor=self.reactor,
            tursodb_bin="/opt/tursodb",
            data_dir=self.data_dir,
            ports=PortAllocator(9000, 9002, is_free=lambda port: True),
            startup_timeout=5,
            child_env={"PATH": "/bin"},
            wrappers=["/usr/bin/setsid"],
            is_serving=lambda pid, port: pid in self.serving,
        )

    def start(self, name: str = "alpha") -> Deferred[TursodbProcess]:
        return ensureDeferred(self.supervisor.start(name))

    def last_child(self) -> TursodbProcess:
        return self.reactor.spawned[-1][0]

    def serve_last(self) -> TursodbProcess:
        child = self.last_child()
        self.serving.add(child.pid)
        self.reactor.advance(0.05)
        return child

    def test_command_line(self) -> None:
        self.start()
        protocol, args, extra = self.reactor.spawned[0]
        self.assertEqual(args, ["/usr/bin/setsid", "/opt/tursodb", f"{self.data_dir}/alpha.db",
                                "--sync-server", "127.0.0.1:9000"])
        root = f"{self.data_dir}/_tmp/tursodb-alpha-9000"
        self.assertEqual(extra["env"], {"PATH": "/bin", "TMPDIR": f"{root}/tmp"})
        self.assertEqual(extra["path"], f"{root}/cwd", "an empty working dir of its own")
        self.assertEqual(os.listdir(f"{root}/cwd"), [])
        self.assertEqual(sorted(os.listdir(self.data_dir)), ["_tmp", "alpha.db", "alpha.db-wal"])
        end(protocol, signal=9)
        self.assertFalse(os.path.exists(root), "the child's own dirs go with it")
        self.assertTrue(protocol.transport.stdin_closed)

    def test_confined_command_line(self) -> None:
        self.supervisor.confinement = Confinement(helper="/usr/bin/turso-landlock", abi=7)
        self.start()
        _, args, _ = self.reactor.spawned[0]
        db, root = f"{self.data_dir}/alpha.db", f"{self.data_dir}/_tmp/tursodb-alpha-9000"
        # The helper enters the child's cwd, session and parent-death signal
        # itself (no setsid/setpriv execs, and no cwd for the reactor, which
        # can then posix_spawn instead of forking the daemon).
        self.assertEqual(args, ["/usr/bin/turso-landlock", "--chdir", f"{root}/cwd",
                                "--parent", str(os.getpid()), "--rw", db, "--rw", db + "-wal",
                                "--rwdir", f"{root}/tmp", "--tcp-bind", "9000",
                                "--", "/opt/tursodb", db, "--sync-server", "127.0.0.1:9000"])
        self.assertIsNone(self.reactor.spawned[0][2].get("path"))

    def test_ready_only_when_serving(self) -> None:
        started = self.start()
        self.reactor.advance(1)
        self.assertNoResult(started)
        child = self.serve_last()
        self.assertIs(self.successResultOf(started).process, child)
        self.assertIs(self.supervisor.running("alpha").process, child)

    def test_startup_timeout_kills_and_fails(self) -> None:
        started = self.start()
        self.reactor.advance(5.1)
        child = self.last_child()
        self.assertEqual(child.transport.signals, ["KILL"])
        self.assertNoResult(started)
        end(child, signal=9)
        failure = self.failureResultOf(started, Refusal)
        self.assertEqual(status_for(failure.value), 503)
        self.assertIn("did not listen within 5s", failure.value.message)
        self.assertIn("'alpha'", failure.value.message)
        self.assertEqual(self.supervisor.ports.in_use, set())

    def test_taken_port_moves_on(self) -> None:
        started = self.start()
        first = self.last_child()
        first.childDataReceived(2, b"Error: Address already in use (os error 98)\n")
        end(first, code=1)
        self.reactor.advance(0.01)
        second = self.serve_last()
        self.assertIsNot(first, second)
        self.assertEqual(second.port, 9001)
        self.assertIs(self.successResultOf(started).process, second)

    def test_exit_at_startup_fails_with_reason(self) -> None:
        started = self.start()
        child = self.last_child()
        child.childDataReceived(2, b"Locking error: File is locked by another process\n")
        end(child, code=1)
        self.reactor.advance(0.01)
        failure = self.failureResultOf(started, Refusal)
        self.assertIn("exit status 1", failure.value.message)

    def test_ports_exhausted(self) -> None:
        self.supervisor.ports = PortAllocator(9000, 9000, is_free=lambda port: False)
        failure = self.failureResultOf(self.start(), Refusal)
        self.assertEqual(status_for(failure.value), 503)
        self.assertIn("no free port", failure.value.message)

    def test_unexpected_exit_then_backoff(self) -> None:
        self.start()
        child = self.serve_last()
        end(child, signal=9)
        self.assertIsNone(self.supervisor.running("alpha"))
        self.assertEqual(self.supervisor.unexpected_exits, 1)
        # First crash: restarted at once.
        self.start()
        child = self.serve_last()
        end(child, signal=9)
        # Second crash in a row: a backoff, answered at once with a 503.
        failure = self.failureResultOf(self.start(), Refusal)
        self.assertEqual(status_for(failure.value), 503)
        self.assertIsNotNone(failure.value.retry_after)
        self.reactor.advance(failure.value.retry_after)
        started = self.start()
        self.serve_last()
        self.successResultOf(started)

    def test_backoff_is_capped_and_resets_after_stable_run(self) -> None:
        for _ in range(12):
            self.reactor.advance(MAX_BACKOFF)
            self.start()
            end(self.serve_last(), signal=9)
        failure = self.failureResultOf(self.start(), Refusal)
        self.assertLessEqual(failure.value.retry_after, MAX_BACKOFF)
        self.reactor.advance(MAX_BACKOFF)
        self.start()
        child = self.serve_last()
        self.reactor.advance(60)
        end(child, signal=9)
        # It ran for a minute: the crash counts as a first one, no backoff.
        started = self.start()
        self.serve_last()
        self.successResultOf(started)

    def test_stop_terms_then_kills(self) -> None:
        self.start()
        child = self.serve_last()
        stopped = self.supervisor.stop("alpha")
        self.assertEqual(child.transport.signals, ["TERM"])
        self.reactor.advance(5)
        self.assertEqual(child.transport.signals, ["TERM", "KILL"])
        self.assertNoResult(stopped)
        end(child, signal=9)
        self.successResultOf(stopped)
        self.assertEqual(self.supervisor.unexpected_exits, 0)
        self.assertEqual(self.supervisor.ports.in_use, set())

    def test_stop_without_child(self) -> None:
        self.successResultOf(self.supervisor.stop("alpha"))

    def test_stop_all(self) -> None:
        self.start("alpha")
        first = self.serve_last()
        self.start("beta")
        second = self.serve_last()
        stopped = self.supervisor.stop_all()
        end(first, signal=15)
        self.assertNoResult(stopped)
        end(second, signal=15)
        self.successResultOf(stopped)
        self.assertEqual(self.supervisor.children(), [])

    def test_output_lines_logged_and_stderr_kept(self) -> None:
        self.start()
        child = self.serve_last()
        child.childDataReceived(2, b"2026-01-01T00:00:00.0Z ERROR thing: bro")
        child.childDataReceived(2, b"ken\nsecond line\n")
        self.assertEqual(list(child.recent_stderr),
                         ["2026-01-01T00:00:00.0Z ERROR thing: broken", "second line"])

    def test_stop_leaves_a_starting_child_to_its_start(self) -> None:
        """
        Only shutdown can meet a child still starting (callers hold the
        name's lock): it is neither signalled nor counted as stopping, so
        room-making never waits on it and its start ends as a start does.
        """
        started = self.start()
        child = self.last_child()
        self.successResultOf(self.supervisor.stop_all())
        self.assertEqual(child.transport.signals, [])
        self.assertEqual([c.phase for c in self.supervisor.children()], ["starting"])
        self.serving.add(child.pid)
        self.reactor.advance(0.05)
        self.assertEqual(self.successResultOf(started).phase, "running")
        self.assertEqual(self.supervisor.unexpected_exits, 0)


class PortAllocatorTests(SynchronousTestCase):
    def test_round_robin_and_skip(self) -> None:
        taken = {9001}
        ports = PortAllocator(9000, 9003, is_free=lambda port: port not in taken)
        self.assertEqual([ports.acquire(), ports.acquire(), ports.acquire()], [9000, 9002, 9003])
        ports.release(9000)
        self.assertEqual(ports.acquire(), 9000)
        with self.assertRaises(PortsExhausted):
            ports.acquire()


class ChildSetupTests(SynchronousTestCase):
    def test_environment_has_no_secrets(self) -> None:
        env = child_environment({"PATH": "/bin", "TURSO_AUTH_TOKEN": "x", "TURSO_ADMIN_TOKEN": "y",
                                 "RUST_LOG": "info", "HOME": "/root"})
        self.assertEqual(env, {"PATH": "/bin", "RUST_LOG": "info"})

    def test_wrappers(self) -> None:
        self.assertEqual(child_wrappers(lambda name: f"/usr/bin/{name}"),
                         ["/usr/bin/setsid", "/usr/bin/setpriv", "--pdeathsig", "KILL", "--"])
        self.assertEqual(child_wrappers(lambda name: None), [])


class ListenerOwnershipTests(SynchronousTestCase):
    def test_finds_our_own_listener_both_ways(self) -> None:
        import os
        import socket

        from turso_twisted.process import _listening_inodes_netlink, _listening_inodes_proc, owns_listener

        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        self.assertFalse(owns_listener(os.getpid(), port))
        listener.listen()
        inode = os.fstat(listener.fileno()).st_ino
        self.assertEqual(_listening_inodes_netlink(port), {inode})
        self.assertEqual(_listening_inodes_proc(port), {inode})
        self.assertTrue(owns_listener(os.getpid(), port))
        self.assertFalse(owns_listener(os.getppid(), port))


