"""
Configuration: environment variables, twistd options and their validation.

Every setting has one row in L{SETTINGS}: its environment variable, its twistd
option, its default and its parser.  An option given on the command line beats
the environment, which beats the default.  Parsing never raises anything but
L{ConfigError}, whose message names the variable and the offending value, so
start-up can fail with one clear line.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from .timefmt import parse_duration
from .tokens import load_keys


class ConfigError(Exception):
    """
    A setting has a value we cannot use; the message says which and why.
    """


@attrs.frozen
class Address:
    """
    A TCP listening address; C{host} is C{""} for every interface.
    """

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_address(text: str) -> Address:
    """
    Parse C{":8080"}, C{"127.0.0.1:8080"} or C{"[::1]:8080"}.
    """
    text = text.strip()
    match = re.fullmatch(r"(?:\[([0-9a-fA-F:.]+)\]|([^:\[\]]*)):(\d{1,5})", text)
    if not match:
        raise ValueError("expected HOST:PORT, :PORT or [IPV6]:PORT")
    port = int(match.group(3))
    if port > 65535:
        raise ValueError("port must be 0..65535")
    return Address(host=match.group(1) or match.group(2) or "", port=port)


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6,
               "mb": 10**6, "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30}


def parse_size(text: str) -> int:
    """
    Parse a byte count: C{"67108864"}, C{"64MiB"}, C{"10MB"}.
    """
    match = re.fullmatch(r"\s*([0-9]+)\s*([a-zA-Z]*)\s*", text, re.ASCII)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError("expected a byte count such as 67108864 or 64MiB")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def _port_number(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError("expected a port number 1..65535")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("expected 0 or a positive whole number")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("expected a whole number of 1 or more")
    return value


def _optional_count(text: str) -> int | None:
    return None if not text.strip() else _non_negative_int(text)


def _workers(text: str) -> int | None:
    return None if not text.strip() else _positive_int(text)


def cpu_count() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _endpoints(text: str) -> tuple[str, ...]:
    """Comma-separated etcd client URLs (C{http://host:2379}); empty: no cluster."""
    endpoints = tuple(part.strip().rstrip("/") for part in text.split(",") if part.strip())
    for endpoint in endpoints:
        if not re.fullmatch(r"https?://[^/\s]+", endpoint):
            raise ValueError(f"{endpoint!r} is not an http(s)://host:port URL")
    return endpoints


def _node_name(text: str) -> str:
    name = text.strip() or socket.gethostname()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", name):
        raise ValueError("a node name is 1-63 letters, digits, '.', '_' or '-', starting with a letter "
                         "or digit")
    return name


def _url(text: str) -> str:
    url = text.strip().rstrip("/")
    if url and not re.fullmatch(r"https?://[^/\s]+", url):
        raise ValueError("expected an http(s)://host:port URL")
    return url


def _prefix(text: str) -> str:
    prefix = "/" + text.strip().strip("/")
    if not re.fullmatch(r"/[A-Za-z0-9._/-]{1,100}", prefix):
        raise ValueError("expected a key prefix such as /turso-server")
    return prefix


def _confine_mode(text: str) -> str:
    mode = text.strip().lower()
    if mode not in ("auto", "landlock", "none"):
        raise ValueError("expected auto, landlock or none")
    return mode


def tls_ports(text: str) -> frozenset[str]:
    """The ports named in C{TURSO_TLS_PORTS}."""
    ports = frozenset(part.strip().lower() for part in text.split(",") if part.strip())
    unknown = ports - {"data", "admin"}
    if unknown:
        raise ValueError(f"unknown port(s) {', '.join(sorted(unknown))}: expected data and/or admin")
    if not ports:
        raise ValueError("name data and/or admin")
    return ports


def _log_format(text: str) -> str:
    log_format = text.strip().lower()
    if log_format not in ("json", "text"):
        raise ValueError("expected json or text")
    return log_format


#: Where a new name is placed in a cluster (see L{turso_twisted.cluster.Cluster.choose}).
PLACEMENTS = ("local", "least-namespaces", "least-bytes")


def _placement(text: str) -> str:
    policy = text.strip().lower()
    if policy not in PLACEMENTS:
        raise ValueError("expected " + ", ".join(PLACEMENTS[:-1]) + " or " + PLACEMENTS[-1])
    return policy


def _positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError("must be longer than zero")
    return value


@attrs.frozen
class Setting:
    """
    One configurable value: where it comes from and how it is parsed.
    """

    env: str
    option: str
    default: str
    parse: Callable[[str], Any]
    doc: str
    secret: bool = False

    @property
    def field(self) -> str:
        return self.option.replace("-", "_")


SETTINGS: tuple[Setting, ...] = (
    Setting("TURSO_DATA_ADDR", "data-addr", ":8080", parse_address,
            "Bind address for the data listener"),
    Setting("TURSO_ADMIN_ADDR", "admin-addr", ":8081", parse_address,
            "Bind address for the admin listener"),
    Setting("TURSO_DATA_WORKERS", "data-workers", "", _workers,
            "Processes serving the data port (empty: one per CPU; 1: the main process alone)"),
    Setting("TURSO_DATA_DIR", "data-dir", "/var/lib/turso", str,
            "Where db files and state live"),
    Setting("TURSODB_BIN", "tursodb-bin", "/usr/local/bin/tursodb", str,
            "Path to the upstream tursodb binary (PATH is searched if the "
            "default is absent)"),
    Setting("TURSO_AUTH_TOKEN", "auth-token", "", str,
            "Bearer token for the data port (empty: no auth, dev only)", secret=True),
    Setting("TURSO_AUTH_TOKEN_FILE", "auth-token-file", "", str,
            "File holding the data-port token"),
    Setting("TURSO_ADMIN_TOKEN", "admin-token", "", str,
            "Bearer token for the admin port (empty: no auth, dev only)", secret=True),
    Setting("TURSO_ADMIN_TOKEN_FILE", "admin-token-file", "", str,
            "File holding the admin-port token"),
    Setting("TURSO_JWT_KEY", "jwt-key", "", str,
            "Ed25519 public key(s) that sign data-port tokens (JWTs): PEM PUBLIC KEY blocks or URL-safe "
            "base64 of the raw key; several = rotation. Empty: no JWTs (the static token, if any)"),
    Setting("TURSO_JWT_KEY_FILE", "jwt-key-file", "", str,
            "File holding TURSO_JWT_KEY (systemd credentials, Kubernetes secrets)"),
    Setting("TURSO_JWT_LEEWAY", "jwt-leeway", "60s", parse_duration,
            "Slack allowed on a token's exp and nbf for clocks that differ"),
    Setting("TURSO_BACKEND_PORT_START", "backend-port-start", "9000", _port_number,
            "Lower bound of the internal port range"),
    Setting("TURSO_BACKEND_PORT_END", "backend-port-end", "9999", _port_number,
            "Upper bound of the internal port range"),
    Setting("TURSO_MAX_NAMESPACES", "max-namespaces", "256", _non_negative_int,
            "Hard cap on live namespaces (0 = unlimited)"),
    Setting("TURSO_ALLOW_AUTO_PROVISION", "allow-auto-provision", "true", parse_bool,
            "Auto-create namespaces on first data-port hit"),
    Setting("TURSO_STARTUP_TIMEOUT", "startup-timeout", "5s", _positive_duration,
            "Max time to wait for a spawned tursodb to listen"),
    Setting("TURSO_GC_INTERVAL", "gc-interval", "1h", _positive_duration,
            "How often the GC sweeps idle namespaces"),
    Setting("TURSO_AUTO_IDLE_DURATION", "auto-idle-duration", "168h", _positive_duration,
            "Auto-created namespaces idle longer than this are archived"),
    Setting("TURSO_ARCHIVE_RETENTION", "archive-retention", "720h", _positive_duration,
            "Archive entries older than this are deleted"),
    Setting("TURSO_MAX_BODY_BYTES", "max-body-bytes", "64MiB", parse_size,
            "Largest request body the data port accepts (larger: 413)"),
    Setting("TURSO_MAX_RESTORE_BYTES", "max-restore-bytes", "4GiB", parse_size,
            "Largest body the admin port accepts (a database file to restore)"),
    Setting("TURSO_HIBERNATE_AFTER", "hibernate-after", "10m", parse_duration,
            "Stop the child of a namespace idle this long; files stay, the next request wakes it "
            "(0 = never)"),
    Setting("TURSO_MAX_RUNNING", "max-running", "", _optional_count,
            "Cap on resident children; at the cap the least recently used idle one is hibernated "
            "(empty: same as TURSO_MAX_NAMESPACES; 0 = unlimited)"),
    Setting("TURSO_QUEUE_DEPTH", "queue-depth", "128", _positive_int,
            "Requests that may wait for one namespace's child; more get 503"),
    Setting("TURSO_QUEUE_TIMEOUT", "queue-timeout", "30s", _positive_duration,
            "How long a request may wait for its namespace's child; longer gets 503"),
    Setting("TURSO_BACKEND_TIMEOUT", "backend-timeout", "30s", parse_duration,
            "How long a child may take to answer one request; a child that takes longer is killed "
            "and restarted, the request gets 504 (0 = no limit)"),
    Setting("TURSO_MAX_HELD_BYTES", "max-held-bytes", "1GiB", parse_size,
            "Answers waiting for clients that read slowly, in bytes (spooled to the data dir past "
            "256 KiB each); past it new data requests get 503"),
    Setting("TURSO_CLIENT_IDLE_TIMEOUT", "client-idle-timeout", "2m", _positive_duration,
            "Idle keep-alive client connections are closed after this"),
    Setting("TURSO_ACCESS_LOG", "access-log", "true", parse_bool,
            "One log line per proxied request"),
    Setting("TURSO_LOG_FORMAT", "log-format", "json", _log_format,
            "How log lines are written: json (one JSON object per line, for log pipelines) or text "
            "(time, level, namespace, message and fields, for a person)"),
    Setting("TURSO_METRICS_PUBLIC", "metrics-public", "false", parse_bool,
            "Serve GET /metrics on the admin port without the admin token"),
    Setting("TURSO_SHUTDOWN_TIMEOUT", "shutdown-timeout", "10s", parse_duration,
            "How long a graceful shutdown waits for in-flight requests"),
    Setting("TURSO_CLUSTER_ETCD", "cluster-etcd", "", _endpoints,
            "etcd (v3) client URLs, comma-separated, that the nodes of a cluster agree through (empty: "
            "one node, no cluster)"),
    Setting("TURSO_CLUSTER_PREFIX", "cluster-prefix", "/turso-server", _prefix,
            "The etcd key prefix of this cluster (several clusters can share one etcd)"),
    Setting("TURSO_CLUSTER_PLACEMENT", "cluster-placement", "local", _placement,
            "Which node a new name is placed on: local (the node its first request or create call "
            "reached), least-namespaces or least-bytes (the live node that owns the fewest, or holds "
            "the fewest bytes)"),
    Setting("TURSO_NODE_NAME", "node-name", "", _node_name,
            "This node's name in the cluster, unique and stable (empty: the host name; in Kubernetes "
            "the pod name)"),
    Setting("TURSO_CLUSTER_ADDR", "cluster-addr", ":8082", parse_address,
            "Bind address of the internal listener peers forward requests to (cluster mode)"),
    Setting("TURSO_NODE_URL", "node-url", "", _url,
            "How peers reach this node's internal listener (empty: http://<bound address>:<port>, or "
            "http://<node name>:<port> when it listens on every interface)"),
    Setting("TURSO_CLUSTER_TOKEN", "cluster-token", "", str,
            "Shared secret of the nodes of a cluster: it opens their internal listeners", secret=True),
    Setting("TURSO_CLUSTER_TOKEN_FILE", "cluster-token-file", "", str,
            "File holding TURSO_CLUSTER_TOKEN"),
    Setting("TURSO_TLS_CERT_FILE", "tls-cert-file", "", str,
            "PEM certificate (the server's first, then its chain) to serve HTTPS with; read again "
            "when it changes or on SIGHUP (empty: plain HTTP)"),
    Setting("TURSO_TLS_KEY_FILE", "tls-key-file", "", str,
            "PEM private key of TURSO_TLS_CERT_FILE (unencrypted)"),
    Setting("TURSO_TLS_PORTS", "tls-ports", "data,admin", tls_ports,
            "Which ports serve HTTPS when a certificate is set: data, admin, or both"),
    Setting("TURSO_CONFINE", "confine", "auto", _confine_mode,
            "Confine each child to its own files and scratch dir: landlock (required), auto "
            "(Landlock where the kernel and the helper allow, else a WARN), none"),
    Setting("TURSO_LANDLOCK_BIN", "landlock-bin", "turso-landlock", str,
            "The Landlock helper children are started through (PATH is searched)"),
)

SETTINGS_BY_ENV = {setting.env: setting for setting in SETTINGS}


@attrs.frozen
class Config:
    """
    The daemon's validated configuration.
    """

    data_addr: Address
    admin_addr: Address
    data_workers: int
    data_dir: str
    tursodb_bin: str
    auth_token: str = attrs.field(repr=False)
    admin_token: str = attrs.field(repr=False)
    jwt_key: str
    jwt_leeway: float
    backend_port_start: int
    backend_port_end: int
    max_namespaces: int
    allow_auto_provision: bool
    startup_timeout: float
    gc_interval: float
    auto_idle_duration: float
    archive_retention: float
    max_body_bytes: int
    max_restore_bytes: int
    hibernate_after: float
    max_running: int
    queue_depth: int
    queue_timeout: float
    backend_timeout: float
    max_held_bytes: int
    client_idle_timeout: float
    access_log: bool
    log_format: str
    metrics_public: bool
    shutdown_timeout: float
    cluster_etcd: tuple[str, ...]
    cluster_prefix: str
    cluster_placement: str
    node_name: str
    cluster_addr: Address
    node_url: str
    cluster_token: str = attrs.field(repr=False)
    tls_cert_file: str
    tls_key_file: str
    tls_ports: frozenset[str]
    confine: str
    landlock_bin: str

    @property
    def clustered(self) -> bool:
        return bool(self.cluster_etcd)

    def tls_on(self, port: str) -> bool:
        """Whether C{port} (data or admin) serves HTTPS."""
        return bool(self.tls_cert_file) and port in self.tls_ports

    @classmethod
    def load(
        cls,
        options: Mapping[str, str | None] | None = None,
        environ: Mapping[str, str] | None = None,
        check_files: bool = True,
    ) -> Config:
        """
        Build the configuration from twistd C{options} (keyed by option name),
        then C{environ}, then defaults, and validate it.

        @raise ConfigError: naming the variable and value at fault.
        """
        options = options or {}
        environ = os.environ if environ is None else environ
        raw: dict[str, tuple[Setting, str, str]] = {}
        for setting in SETTINGS:
            given = options.get(setting.option)
            if given is not None:
                raw[setting.field] = (setting, given, f"--{setting.option}")
            elif setting.env in environ:
                raw[setting.field] = (setting, environ[setting.env], setting.env)
            else:
                raw[setting.field] = (setting, setting.default, "")

        values: dict[str, Any] = {}
        for field, (setting, text, source) in raw.items():
            source = source or setting.env
            try:
                values[field] = setting.parse(text)
            except ValueError as error:
                shown = "<redacted>" if setting.secret else repr(text)
                raise ConfigError(f"{source}={shown}: {error}") from None

        for token_field, file_field in (("auth_token", "auth_token_file"),
                                        ("admin_token", "admin_token_file"), ("jwt_key", "jwt_key_file"),
                                        ("cluster_token", "cluster_token_file")):
            # An option (token or file) beats the environment (token or file);
            # a token and a file from the same level are ambiguous.
            levels = [(_level(raw[f]), f) for f in (token_field, file_field) if values[f]]
            best = max((level for level, _ in levels), default=0)
            chosen = [f for level, f in levels if level == best]
            if len(chosen) == 2:
                raise ConfigError(
                    f"{_source(raw[token_field])} and {_source(raw[file_field])} are both set; "
                    "give it one way only"
                )
            if chosen == [file_field]:
                values[token_field] = _read_token(_source(raw[file_field]), values[file_field])
            elif not chosen:
                values[token_field] = ""
            del values[file_field]

        if values["jwt_key"]:
            try:
                load_keys(values["jwt_key"])
            except ValueError as error:
                source = _source(raw["jwt_key_file"]) if raw["jwt_key_file"][1] else _source(raw["jwt_key"])
                raise ConfigError(f"{source}: {error}") from None
        if values["auth_token"] and values["auth_token"] == values["admin_token"]:
            raise ConfigError(
                "TURSO_AUTH_TOKEN and TURSO_ADMIN_TOKEN are the same: the data token "
                "must not also be the admin token"
            )
        if values["backend_port_start"] > values["backend_port_end"]:
            raise ConfigError(
                f"TURSO_BACKEND_PORT_START={values['backend_port_start']} is above "
                f"TURSO_BACKEND_PORT_END={values['backend_port_end']}: the range is inverted"
            )
        if bool(values["tls_cert_file"]) != bool(values["tls_key_file"]):
            given, missing = (("TURSO_TLS_CERT_FILE", "TURSO_TLS_KEY_FILE") if values["tls_cert_file"]
                              else ("TURSO_TLS_KEY_FILE", "TURSO_TLS_CERT_FILE"))
            raise ConfigError(f"{given} is set but {missing} is not: TLS needs both")
        if values["cluster_etcd"]:
            if not values["cluster_token"]:
                raise ConfigError("TURSO_CLUSTER_ETCD is set but TURSO_CLUSTER_TOKEN is not: the nodes "
                                  "of a cluster need a shared secret for their internal listeners")
            if values["cluster_token"] in (values["auth_token"], values["admin_token"]):
                raise ConfigError("TURSO_CLUSTER_TOKEN must differ from the data and admin tokens")
        # One spelling of the data dir, so that every comparison of paths
        # (orphaned children, files) sees through symlinks.
        values["data_dir"] = os.path.realpath(values["data_dir"])
        if values["data_workers"] is None:
            values["data_workers"] = cpu_count()
        if values["max_running"] is None:
            values["max_running"] = values["max_namespaces"]
        config = cls(**values)
        if check_files:
            config = config._checked_files(bin_was_given=bool(raw["tursodb_bin"][2]))
        return config

    def _checked_files(self, bin_was_given: bool) -> Config:
        """
        Make sure the binary runs and the data dir is usable.
        """
        tursodb = self.tursodb_bin
        if not (os.path.isfile(tursodb) and os.access(tursodb, os.X_OK)):
            found = None if bin_was_given else shutil.which("tursodb")
            if found is None:
                raise ConfigError(
                    f"TURSODB_BIN={tursodb!r}: no executable tursodb there"
                    + ("" if bin_was_given else " nor on PATH")
                )
            tursodb = found
        data_dir = self.data_dir
        try:
            os.makedirs(data_dir, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"TURSO_DATA_DIR={data_dir!r}: cannot create it: {error.strerror}") from None
        if not os.access(data_dir, os.W_OK | os.X_OK):
            raise ConfigError(f"TURSO_DATA_DIR={data_dir!r}: not writable by this user")
        return attrs.evolve(self, tursodb_bin=os.path.abspath(tursodb))


def _level(raw: tuple[Setting, str, str]) -> int:
    """
    2 for a command-line option, 1 for the environment, 0 for a default.
    """
    source = raw[2]
    return 2 if source.startswith("--") else 1 if source else 0


def _source(raw: tuple[Setting, str, str]) -> str:
    return raw[2] or raw[0].env


def _read_token(source: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            token = handle.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ConfigError(f"{source}={path!r}: cannot read it: {reason}") from None
    if not token:
        raise ConfigError(f"{source}={path!r}: the file is empty")
    return token
