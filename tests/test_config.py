"""
Configuration: parsing, precedence and the one-line errors.
"""

from __future__ import annotations

import os
import stat

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from turso_twisted.config import SETTINGS, Address, Config, ConfigError, parse_address, parse_size
from turso_twisted.timefmt import format_duration, parse_duration


class DurationTests(SynchronousTestCase):
    def test_go_syntax(self) -> None:
        self.assertEqual(parse_duration("5s"), 5)
        self.assertEqual(parse_duration("1h"), 3600)
        self.assertEqual(parse_duration("168h0m0s"), 168 * 3600)
        self.assertEqual(parse_duration("1h30m"), 5400)
        self.assertEqual(parse_duration("1.5s"), 1.5)
        self.assertEqual(parse_duration("300ms"), 0.3)
        self.assertEqual(parse_duration("0"), 0)

    def test_days(self) -> None:
        self.assertEqual(parse_duration("7d"), 7 * 86400)
        self.assertEqual(parse_duration("30d"), 30 * 86400)

    def test_rejects(self) -> None:
        for text in ("", "5", "s", "5x", "1h 30m", "-5s", "5s5", "h1", "1e3s", "five seconds",
                     "\uff11h", "\u0663h", "1\u0660s"):
            with self.assertRaises(ValueError, msg=text):
                parse_duration(text)

    @given(st.integers(min_value=0, max_value=10**7))
    def test_format_round_trips(self, seconds: int) -> None:
        self.assertEqual(parse_duration(format_duration(seconds)), seconds)

    @given(st.text(alphabet="0123456789.", min_size=1, max_size=8),
           st.sampled_from(["ns", "us", "µs", "ms", "s", "m", "h", "d"]))
    def test_every_duration_read_is_written_back_readable(self, number: str, unit: str) -> None:
        """
        Whatever parse_duration accepts, format_duration writes in a form
        it reads back to the same value (a TTL stored in the state file
        must load again).
        """
        try:
            seconds = parse_duration(number + unit)
        except ValueError:
            return
        again = parse_duration(format_duration(seconds))
        self.assertAlmostEqual(again, seconds, delta=max(1e-9, seconds * 1e-9))

    def test_format(self) -> None:
        self.assertEqual(format_duration(3600), "1h0m0s")
        self.assertEqual(format_duration(30 * 86400), "720h0m0s")
        self.assertEqual(format_duration(1.5), "1.5s")
        self.assertEqual(format_duration(0), "0s")


class AddressTests(SynchronousTestCase):
    def test_forms(self) -> None:
        self.assertEqual(parse_address(":8080"), Address("", 8080))
        self.assertEqual(parse_address("127.0.0.1:0"), Address("127.0.0.1", 0))
        self.assertEqual(parse_address("[::1]:8081"), Address("::1", 8081))
        self.assertEqual(str(Address("::1", 1)), "[::1]:1")

    def test_rejects(self) -> None:
        for text in ("8080", "host", ":", ":99999", "a:b", "[::1]", "1.2.3.4:80:80"):
            with self.assertRaises(ValueError, msg=text):
                parse_address(text)


class SizeTests(SynchronousTestCase):
    def test_sizes(self) -> None:
        self.assertEqual(parse_size("64MiB"), 64 << 20)
        self.assertEqual(parse_size("1024"), 1024)
        self.assertEqual(parse_size("10MB"), 10**7)
        with self.assertRaises(ValueError):
            parse_size("lots")


class LoadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.bin = os.path.join(self.dir, "tursodb")
        with open(self.bin, "w") as handle:
            handle.write("#!/bin/sh\n")
        os.chmod(self.bin, 0o755)
        self.env = {"TURSODB_BIN": self.bin, "TURSO_DATA_DIR": os.path.join(self.dir, "data")}

    def load(self, options: dict[str, str] | None = None, **env: str) -> Config:
        return Config.load(options or {}, {**self.env, **env})

    def assertFails(self, *fragments: str, options: dict[str, str] | None = None, **env: str) -> str:
        with self.assertRaises(ConfigError) as caught:
            self.load(options, **env)
        message = str(caught.exception)
        for fragment in fragments:
            self.assertIn(fragment, message)
        self.assertNotIn("\n", message)
        return message

    def test_defaults_match_the_design_note(self) -> None:
        config = Config.load({}, self.env)
        self.assertEqual(config.data_addr, Address("", 8080))
        self.assertEqual(config.admin_addr, Address("", 8081))
        self.assertEqual((config.backend_port_start, config.backend_port_end), (9000, 9999))
        self.assertEqual(config.max_namespaces, 256)
        self.assertTrue(config.allow_auto_provision)
        self.assertEqual(config.startup_timeout, 5)
        self.assertEqual(config.gc_interval, 3600)
        self.assertEqual(config.auto_idle_duration, 168 * 3600)
        self.assertEqual(config.archive_retention, 720 * 3600)
        self.assertEqual(config.max_body_bytes, 64 << 20)
        self.assertEqual(config.auth_token, "")
        defaults = {s.env: s.default for s in SETTINGS}
        self.assertEqual(defaults["TURSO_DATA_DIR"], "/var/lib/turso")
        self.assertEqual(defaults["TURSODB_BIN"], "/usr/local/bin/tursodb")

    def test_option_beats_environment(self) -> None:
        config = self.load({"max-namespaces": "3"}, TURSO_MAX_NAMESPACES="7")
        self.assertEqual(config.max_namespaces, 3)
        self.assertEqual(self.load(TURSO_MAX_NAMESPACES="7").max_namespaces, 7)

    def test_bad_duration_names_variable_and_value(self) -> None:
        self.assertFails("TURSO_GC_INTERVAL='soon'", TURSO_GC_INTERVAL="soon")
        self.assertFails("--gc-interval='0'", options={"gc-interval": "0"})

    def test_inverted_port_range(self) -> None:
        self.assertFails("TURSO_BACKEND_PORT_START=9100", "inverted",
                         TURSO_BACKEND_PORT_START="9100", TURSO_BACKEND_PORT_END="9000")

    def test_bad_port_and_bool_and_count(self) -> None:
        self.assertFails("TURSO_BACKEND_PORT_END='70000'", TURSO_BACKEND_PORT_END="70000")
        self.assertFails("TURSO_ALLOW_AUTO_PROVISION='maybe'", TURSO_ALLOW_AUTO_PROVISION="maybe")
        self.assertFails("TURSO_MAX_NAMESPACES='-1'", TURSO_MAX_NAMESPACES="-1")
        self.assertFails("TURSO_DATA_ADDR='8080'", TURSO_DATA_ADDR="8080")

    def test_missing_binary(self) -> None:
        self.assertFails("TURSODB_BIN='/nonexistent/tursodb'", TURSODB_BIN="/nonexistent/tursodb")

    def test_data_dir_not_writable(self) -> None:
        if os.geteuid() == 0:
            # root writes anywhere; a path under a regular file fails for all.
            blocker = os.path.join(self.dir, "file")
            open(blocker, "w").close()
            self.assertFails("TURSO_DATA_DIR=", "cannot create", TURSO_DATA_DIR=os.path.join(blocker, "d"))
            return
        locked = os.path.join(self.dir, "locked")
        os.makedirs(locked)
        os.chmod(locked, stat.S_IRUSR | stat.S_IXUSR)
        self.assertFails("not writable", TURSO_DATA_DIR=locked)

    def test_token_files(self) -> None:
        path = os.path.join(self.dir, "token")
        with open(path, "w") as handle:
            handle.write("s3cret\n")
        self.assertEqual(self.load(TURSO_AUTH_TOKEN_FILE=path).auth_token, "s3cret")
        self.assertEqual(self.load(TURSO_ADMIN_TOKEN_FILE=path).admin_token, "s3cret")

    def test_token_file_problems(self) -> None:
        empty = os.path.join(self.dir, "empty")
        open(empty, "w").close()
        self.assertFails("TURSO_AUTH_TOKEN_FILE=", "empty", TURSO_AUTH_TOKEN_FILE=empty)
        self.assertFails("cannot read", TURSO_ADMIN_TOKEN_FILE=os.path.join(self.dir, "none"))
        self.assertFails("both set", TURSO_AUTH_TOKEN="a", TURSO_AUTH_TOKEN_FILE=empty)

    def test_option_token_beats_environment_file(self) -> None:
        path = os.path.join(self.dir, "token")
        with open(path, "w") as handle:
            handle.write("from-file")
        config = self.load({"auth-token": "from-option"}, TURSO_AUTH_TOKEN_FILE=path)
        self.assertEqual(config.auth_token, "from-option")
        config = self.load({"auth-token-file": path}, TURSO_AUTH_TOKEN="from-env")
        self.assertEqual(config.auth_token, "from-file")

    def test_absurd_durations_refused(self) -> None:
        self.assertFails("longer than 100 years", TURSO_GC_INTERVAL="9" * 330 + "h")
        self.assertFails("longer than 100 years", TURSO_GC_INTERVAL="1e20h".replace("e20", "0" * 20))

    def test_data_dir_symlink_resolved(self) -> None:
        real = os.path.abspath(os.path.join(self.dir, "real"))
        os.makedirs(real)
        link = os.path.abspath(os.path.join(self.dir, "link"))
        os.symlink(real, link)
        self.assertEqual(self.load(TURSO_DATA_DIR=link).data_dir, os.path.realpath(real))

    def test_same_token_for_both_ports_is_refused(self) -> None:
        message = self.assertFails("must not also be the admin token",
                                   TURSO_AUTH_TOKEN="same", TURSO_ADMIN_TOKEN="same")
        self.assertNotIn("same'", message)

    def test_tokens_not_in_repr(self) -> None:
        config = self.load(TURSO_AUTH_TOKEN="data-secret", TURSO_ADMIN_TOKEN="admin-secret")
        self.assertNotIn("secret", repr(config))

    def test_cluster_settings(self) -> None:
        self.assertFalse(self.load().clustered)
        config = self.load(TURSO_CLUSTER_ETCD="http://etcd-0:2379, http://etcd-1:2379/",
                           TURSO_CLUSTER_TOKEN="cluster-secret", TURSO_NODE_NAME="turso-1",
                           TURSO_CLUSTER_PREFIX="prod/turso/")
        self.assertTrue(config.clustered)
        self.assertEqual(config.cluster_etcd, ("http://etcd-0:2379", "http://etcd-1:2379"))
        self.assertEqual((config.node_name, config.cluster_prefix), ("turso-1", "/prod/turso"))
        self.assertNotIn("cluster-secret", repr(config))
        self.assertEqual(config.cluster_placement, "local")
        self.assertEqual(self.load(TURSO_CLUSTER_PLACEMENT=" Least-Bytes").cluster_placement, "least-bytes")

    def test_tls_settings(self) -> None:
        config = self.load()
        self.assertFalse(config.tls_on("data") or config.tls_on("admin"))
        config = self.load(TURSO_TLS_CERT_FILE="/c.pem", TURSO_TLS_KEY_FILE="/k.pem")
        self.assertTrue(config.tls_on("data") and config.tls_on("admin"))
        config = self.load(TURSO_TLS_CERT_FILE="/c.pem", TURSO_TLS_KEY_FILE="/k.pem",
                           TURSO_TLS_PORTS=" Data ")
        self.assertEqual((config.tls_on("data"), config.tls_on("admin")), (True, False))
        self.assertFails("TURSO_TLS_CERT_FILE is set but TURSO_TLS_KEY_FILE is not",
                         TURSO_TLS_CERT_FILE="/c.pem")
        self.assertFails("TURSO_TLS_KEY_FILE is set but TURSO_TLS_CERT_FILE is not",
                         TURSO_TLS_KEY_FILE="/k.pem")
        self.assertFails("unknown port(s) cluster", TURSO_TLS_PORTS="data,cluster")

    def test_log_format(self) -> None:
        self.assertEqual(self.load().log_format, "json")
        self.assertEqual(self.load(TURSO_LOG_FORMAT="Text ").log_format, "text")
        self.assertFails("expected json or text", TURSO_LOG_FORMAT="yaml")

    def test_cluster_settings_refused(self) -> None:
        self.assertFails("TURSO_CLUSTER_TOKEN is not", TURSO_CLUSTER_ETCD="http://etcd:2379")
        self.assertFails("TURSO_CLUSTER_ETCD='etcd:2379'", TURSO_CLUSTER_ETCD="etcd:2379")
        message = self.assertFails("must differ", TURSO_CLUSTER_ETCD="http://etcd:2379",
                                   TURSO_CLUSTER_TOKEN="same", TURSO_AUTH_TOKEN="same")
        self.assertNotIn("same", message)
        self.assertFails("TURSO_NODE_NAME='-bad'", TURSO_NODE_NAME="-bad")
        self.assertFails("expected local, least-namespaces or least-bytes", TURSO_CLUSTER_PLACEMENT="random")
        self.assertFails("TURSO_NODE_URL='node:8082'", TURSO_NODE_URL="node:8082")
