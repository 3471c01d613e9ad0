"""
C{turso-server-admin}: the admin API from a shell.

Reads C{TURSO_SERVER_ADMIN_URL} and C{TURSO_SERVER_ADMIN_TOKEN} (the names
the design note's chart wires in); C{--url} and C{--token} override them.
Human-readable output by default, C{--json} for scripts.  Exit status: 0
done, 1 the server refused or something failed, 2 bad usage, 3 the server
could not be reached.  Errors are one line on stderr.

It is a short-lived tool, so it talks plain blocking HTTP (urllib); the
daemon is the one that must never block.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from http.client import HTTPResponse
from typing import IO, Any, cast

import argcomplete
from tqdm import tqdm

from .backupstore import BACKUP_FILE, StoredBackup, StoreError, beyond_retention, open_store
from .timefmt import parse_duration
from .tokens import generate_key_pair, mint

DEFAULT_URL = "http://127.0.0.1:8081"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class CommandFailed(Exception):
    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


class Client:
    def __init__(self, url: str, token: str | None, timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _request(self, method: str, path: str, body: bytes | IO[bytes] | None = None,
                 length: int | None = None) -> HTTPResponse:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        if length is not None:
            request.add_header("Content-Length", str(length))
            request.add_header("Content-Type", "application/vnd.sqlite3")
        try:
            # What urlopen returns for an http(s) URL.
            return cast(HTTPResponse, urllib.request.urlopen(request, timeout=self.timeout))
        except urllib.error.HTTPError as error:
            raise CommandFailed(_describe_error(error)) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise CommandFailed(f"cannot reach {self.url}: {reason}", EXIT_UNREACHABLE) from None

    def json(self, method: str, path: str, payload: Any = None) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        with self._request(method, path, body) as response:
            return json.loads(response.read() or b"null")

    def stream(self, path: str) -> HTTPResponse:
        return self._request("GET", path)

    def upload(self, path: str, file_path: str) -> Any:
        size = os.path.getsize(file_path)
        with open(file_path, "rb") as handle, self._request("POST", path, handle, size) as response:
            return json.loads(response.read())


def _describe_error(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read())
        return f"{body['error']}: {body['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {error.code} {error.reason}"


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


# -- output ---------------------------------------------------------------------


def _readable(value: Any) -> str:
    """A value for people: nested objects as key=value lists, not Python's repr."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return ", ".join(f"{key}={_readable(item)}" for key, item in value.items()) or "-"
    if isinstance(value, list):
        return ("; " if any(isinstance(item, dict) for item in value) else ", ").join(
            _readable(item) for item in value) or "-"
    return str(value)


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]], out: IO[str]) -> None:
    cells = [[title for title, _ in columns]]
    for row in rows:
        cells.append([_readable(row.get(key)) for _, key in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        padded = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        out.write("  ".join(padded).rstrip() + "\n")


NAMESPACE_COLUMNS = [("NAME", "name"), ("ORIGIN", "origin"), ("LOCKED", "locked"), ("TTL", "ttl"),
                     ("RUNNING", "running"), ("LAST ACCESS", "lastAccessAt")]


def _show(record: dict[str, Any], out: IO[str]) -> None:
    width = max(len(key) for key in record)
    for key, value in record.items():
        out.write(f"{key.ljust(width)}  {_readable(value)}\n")


# -- commands -------------------------------------------------------------------

#: A subcommand: does its work, prints for people, returns what C{--json} prints.
Command = Callable[[Client, argparse.Namespace, IO[str]], Any]


def cmd_list(client: Client, args: argparse.Namespace, out: IO[str]) -> Any:
    result = client.json("GET", "/v1/namespaces")
    if not args.json:
        rows = result["namespaces"]
        # A cluster's nodes list every node's namespaces, each with its node.
        columns = NAMESPACE_COLUMNS + ([("NODE", "node")] if any("node" in row for row in rows) else [])
        _table(rows, columns, out)
    return result


def _record_command(method: str, suffix: str,
                    payload: Callable[[argparse.Namespace], dict[str, Any]] | None = None) -> Command:
    def command(client: Client, args: argparse.Namespace, out: IO[str]) -> Any:
        record = client.json(method, f"/v1/namespaces/{_quote(args.name)}{suffix}", payload(args)
                             if callable(payload) else payload)
        if not args.json:
            _show(record.get("archived", record), out)
        return record

    return command


def _ttl_body(args: argparse.Namespace) -> dict[str, Any]:
    return {"ttl": None if args.ttl.lower() in ("none", "null", "off") else args.ttl}


def _unarchive_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"locked": not args.unlocked}
    if args.archived_at:
        body["archivedAt"] = args.archived_at
    return body


def cmd_archive(client: Client, args: argparse.Namespace, out: IO[str]) -> Any:
    query = f"?name={_quote(args.name)}" if args.name else ""
    result = client.json("GET", f"/v1/archive{query}")
    if not args.json:
        _table(result["entries"], [("ENTRY", "entry"), ("NAME", "name"), ("ARCHIVED", "archivedAt"),
                                   ("REASON", "reason")], out)
    return result


def cmd_fork(client: Client, args: argparse.Namespace, out: IO[str]) -> Any:
    record = client.json("POST", f"/v1/namespaces/{_quote(args.name)}/fork/{_quote(args.target)}")
    if not args.json:
        _show(record, out)
    return record


def cmd_restore(client: Client, args: argparse.Namespace, out: IO[str]) -> Any:
    query = []
    if args.source:
        query.append(f"source={_quote(args.source)}")
    if args.allow_foreign:
        query.append("allow_foreign=true")
    if args.allow_other_incarnation:
        query.append("allow_other_incarnation=true")
    path = f"/v1/namespaces/{_quote(args.name)}/restore" + ("?" + "&".join(query) if query else "")
    if args.file.startswith("s3://"):
        # Downloaded (and checked against its sha256) first, then restored.
        with tempfile.TemporaryDirectory(prefix="turso-restore-") as scratch:
            local = os.path.join(scratch, "backup.db")
            bucket_url, _, key = args.file[len("s3://"):].partition("/")
            store = open_store(f"s3://{bucket_url}", args.endpoint_url)
            try:
                store.fetch(StoredBackup("", "", "", os.path.basename(key), args.file), local)
            except StoreError as error:
                raise CommandFailed(str(error)) from None
            record = client.upload(path, local)
    else:
        record = client.upload(path, args.file)
    if not args.json:
        _show(record, out)
    return record


def download_backup(client: Client, name: str, directory: str) -> dict[str, Any]:
    """
    Download C{name}'s backup into C{directory}, checking its sha256 on the
    way; the file appears under its final name only when it is whole.
    """
    os.makedirs(directory, exist_ok=True)
    with client.stream(f"/v1/namespaces/{_quote(name)}/backup") as response:
        disposition = response.headers.get("Content-Disposition", "")
        match = re.search(r'filename="([^"/]+)"', disposition)
        expected = response.headers.get("X-Backup-Sha256", "")
        namespace_id = response.headers.get("X-Backup-Namespace-Id", "")
        if not match or not BACKUP_FILE.match(match.group(1)) or not expected \
                or not re.fullmatch(r"[0-9a-f]{32}", namespace_id):
            raise CommandFailed(f"{name}: the server sent no backup file name, checksum or namespace id")
        final = os.path.join(directory, match.group(1))
        partial = final + ".partial"
        digest = hashlib.sha256()
        size = 0
        try:
            with open(partial, "wb") as handle:
                for block in iter(lambda: response.read(1 << 20), b""):
                    handle.write(block)
                    digest.update(block)
                    size += len(block)
                handle.flush()
                os.fsync(handle.fileno())
            if digest.hexdigest() != expected:
                raise CommandFailed(f"{name}: checksum mismatch (got {digest.hexdigest()}, "
                                    f"server said {expected})")
            os.replace(partial, final)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    return {"name": name, "id": namespace_id, "file": final, "bytes": size, "sha256": expected}


def _store(args: argparse.Namespace, destination: str) -> Any:
    try:
        return open_store(destination, args.endpoint_url)
    except StoreError as error:
        raise CommandFailed(str(error), EXIT_USAGE) from None


def back_up(client: Client, store: Any, name: str, scratch: str) -> dict[str, Any]:
    """
    Take C{name}'s backup and keep it in C{store}: downloaded into
    C{scratch} and checked first, then stored (uploaded and read back, or
    moved into its folder).
    """
    result = download_backup(client, name, scratch)
    try:
        result["file"] = store.put(name, result["id"], result["file"], result["sha256"])
    except StoreError as error:
        raise CommandFailed(f"{name}: {error}") from None
    finally:
        for leftover in os.listdir(scratch):
            os.unlink(os.path.join(scratch, leftover))
    return result


@contextlib.contextmanager
def _scratch(destination: str) -> Iterator[str]:
    """
    Where backups wait before they are stored: a temp dir for a bucket; a
    hidden folder in a local destination (a move into place is a rename).
    """
    if destination.startswith("s3://"):
        with tempfile.TemporaryDirectory(prefix="turso-backup-") as scratch:
            yield scratch
        return
    os.makedirs(destination, exist_ok=True)
    # One per run: two runs into one destination leave each other alone.
    scratch = tempfile.mkdtemp(prefix=".incoming-", dir=destination)
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def cmd_backup(client: Client, args: argparse.Namespace, out: IO[str]) -> Any:
    if args.dest.startswith("s3://"):
        with _scratch(args.dest) as scratch:
            result = back_up(client, _store(args, args.dest), args.name, scratch)
    else:
        result = download_backup(client, args.name, args.dest)
    if not args.json:
        out.write(f"{result['file']}  {result['bytes']} bytes  sha256 {result['sha256']}\n")
    return result


class _Progress:
    """
    Work through many items: a progress bar on a terminal (stderr), and a
    line per item on the output for people (none with JSON, which comes
    whole at the end).
    """

    def __init__(self, args: argparse.Namespace, total: int, what: str, out: IO[str]) -> None:
        self.json, self.out = args.json, out
        self.bar = tqdm(total=total, desc=what, unit="", file=sys.stderr, leave=False, dynamic_ncols=True,
                        disable=args.json or not sys.stderr.isatty())

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *failure: object) -> None:
        self.bar.close()

    def working_on(self, item: str) -> None:
        self.bar.set_postfix_str(item, refresh=True)

    def done(self, line: str) -> None:
        """One item done: its line (above the bar), and the bar one further."""
        if not self.json:
            if self.bar.disable:
                self.out.write(line + "\n")
            else:
                self.bar.write(line, file=self.out)
        self.bar.update(1)


def cmd_backup_all(client: Client, args: argparse.Namespace, out: IO[str]) -> Any:
    listed = client.json("GET", "/v1/namespaces")["namespaces"]
    namespaces = [entry["name"] for entry in listed if entry.get("available", True)]
    store = _store(args, args.dest)
    # A cluster node that is down: its names cannot be backed up now, and say so.
    results: list[dict[str, Any]] = [
        {"name": entry["name"], "ok": False, "error": f"node {entry.get('node')!r} is not reachable"}
        for entry in listed if not entry.get("available", True)]
    for result in results:
        if not args.json:
            out.write(f"{result['name']}: FAILED: {result['error']}\n")
    with _scratch(args.dest) as scratch, _Progress(args, len(namespaces), "backing up", out) as progress:
        for name in namespaces:
            progress.working_on(name)
            try:
                result = back_up(client, store, name, scratch)
                doomed = beyond_retention(store.backups(name), args.keep)
                for old in doomed:
                    store.delete(old)
                result["pruned"] = [old.where for old in doomed]
                result["ok"] = True
            except (CommandFailed, StoreError) as error:
                if isinstance(error, CommandFailed) and error.status == EXIT_UNREACHABLE:
                    raise
                result = {"name": name, "ok": False, "error": str(error)}
            results.append(result)
            progress.done(f"{name}: {result['bytes']} bytes -> {result['file']}" if result["ok"]
                          else f"{name}: FAILED: {result['error']}")
    failed = [r["name"] for r in results if not r["ok"]]
    return _summed_up(args, out, {"backups": results, "failed": failed},
                      f"{len(results) - len(failed)} of {len(results)} namespaces backed up",
                      failed, "backup failed for")


def _summed_up(args: argparse.Namespace, out: IO[str], summary: dict[str, Any], line: str,
               failed: list[str], failure: str) -> dict[str, Any]:
    """
    The end of work on many namespaces: its summary line (for people);
    if any failed, the JSON summary at once and exit status 1.
    """
    if not args.json:
        out.write(line + "\n")
    if failed:
        if args.json:
            out.write(json.dumps(summary, indent=1) + "\n")
        raise CommandFailed(f"{failure} {', '.join(failed)}", EXIT_FAILED)
    return summary


def cmd_restore_all(client: Client, args: argparse.Namespace, out: IO[str]) -> Any:
    """
    Disaster recovery: every namespace with a backup in C{--from} comes
    back into this (fresh) daemon from its newest backup that the restore
    path accepts, through its identity checks.  A name already live is
    skipped; a backup the daemon finds damaged gives way to the one before.
    """
    store = _store(args, args.source)
    try:
        kept = store.backups()
    except StoreError as error:
        raise CommandFailed(str(error)) from None
    if not kept:
        raise CommandFailed(f"no backups under {args.source} (is it what backup-all wrote to?)")
    live = {r["name"]: r for r in client.json("GET", "/v1/namespaces")["namespaces"]}
    by_name: dict[str, list[StoredBackup]] = {}
    for backup in kept:
        by_name.setdefault(backup.name, []).append(backup)
    restored: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="turso-restore-") as scratch, \
            _Progress(args, len(by_name), "restoring", out) as progress:
        for name in sorted(by_name):
            progress.working_on(name)
            outcome = _restore_newest(client, store, name, by_name[name], live, scratch)
            {"restored": restored, "skipped": skipped, "refused": refused}[outcome["outcome"]].append(outcome)
            progress.done(f"{name}: {outcome['outcome']}: {outcome['detail']}")
    return _summed_up(args, out, {"restored": restored, "skipped": skipped, "refused": refused},
                      f"{len(restored)} restored, {len(skipped)} skipped, {len(refused)} refused",
                      [item["name"] for item in refused], "not restored:")


def _restore_newest(client: Client, store: Any, name: str, backups: list[StoredBackup],
                    live: dict[str, dict[str, Any]], scratch: str) -> dict[str, Any]:
    """
    Restore C{name} from its newest backup.  Only backups of the newest
    incarnation are candidates (an older one is another tenant of the
    name); a damaged one gives way to the one before it, a store out of
    reach does not (that would quietly bring back older data).
    """
    if name in live:
        if live[name].get("origin") == "auto":
            return {"name": name, "outcome": "refused",
                    "detail": "live here already, made by a client's first request (during the recovery?): "
                              "check it, then `restore` it by hand; turn TURSO_ALLOW_AUTO_PROVISION off "
                              "while recovering"}
        return {"name": name, "outcome": "skipped", "detail": "already live here (not replaced)"}
    newest = max(backups)
    candidates = sorted((backup for backup in backups if backup.namespace_id == newest.namespace_id),
                        reverse=True)
    problems = []
    for backup in candidates:
        local = os.path.join(scratch, backup.file_name)
        try:
            store.fetch(backup, local)
            record = client.upload(f"/v1/namespaces/{_quote(name)}/restore", local)
        except StoreError as error:
            if not error.damaged:
                return {"name": name, "outcome": "refused", "detail": f"{backup.where}: {error}"}
            problems.append(f"{backup.where}: {error}")
            continue
        except CommandFailed as error:
            if error.status == EXIT_UNREACHABLE:
                raise
            text = str(error)
            if text.startswith(("not_sqlite", "integrity_check_failed", "replay_failed")):
                problems.append(f"{backup.where}: {text}")
                continue  # damaged: the one before may do
            return {"name": name, "outcome": "refused", "detail": f"{backup.where}: {text}"}
        finally:
            if os.path.exists(local):
                os.unlink(local)
        return {"name": name, "outcome": "restored", "id": record.get("id"), "from": backup.where,
                "detail": f"{backup.where} (id {record.get('id')})" + (
                    f", after {len(problems)} damaged newer backup(s)" if problems else "")}
    return {"name": name, "outcome": "refused",
            "detail": "no usable backup of its newest incarnation: " + "; ".join(problems)}


#: Config fields whose values are text, whatever they look like.
_TEXT_FIELDS = ("block_reason", "jwt_key", "tokens_not_before", "max_db_size")


def _config_value(field: str, text: str) -> Any:
    """A config value from the command line: true/false, null, a number, @FILE, or text."""
    lowered = text.lower()
    if field in _TEXT_FIELDS and lowered not in ("null", "none") and not text.startswith("@"):
        return text
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none"):
        return None
    if text.isascii() and text.isdigit():
        return int(text)
    if text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as handle:
                return handle.read()
        except OSError as error:
            raise CommandFailed(f"cannot read {text[1:]}: {error.strerror}", EXIT_USAGE) from None
    return text


def cmd_config(client: Client, args: argparse.Namespace, out: IO[str]) -> Any:
    path = f"/v1/namespaces/{_quote(args.name)}/config"
    if args.action == "get":
        if args.settings:
            raise CommandFailed("config get takes no settings", EXIT_USAGE)
        result = client.json("GET", path)
    else:
        changes = {}
        for setting in args.settings:
            key, equals, value = setting.partition("=")
            if not equals:
                raise CommandFailed(f"expected FIELD=VALUE, not {setting!r}", EXIT_USAGE)
            changes[key] = _config_value(key, value)
        if not changes:
            raise CommandFailed("config set needs at least one FIELD=VALUE", EXIT_USAGE)
        result = client.json("POST", path, changes)
    if not args.json:
        for key, value in result.items():
            out.write(f"{key:<18} {json.dumps(value)}\n")
    return result


def cmd_keygen(client: Client, args: argparse.Namespace, out: IO[str]) -> Any:
    private_pem, public_pem = generate_key_pair()
    os.makedirs(args.out, exist_ok=True)
    private_path = os.path.join(args.out, "jwt-private.pem")
    public_path = os.path.join(args.out, "jwt-public.pem")
    for path in (private_path, public_path):
        if os.path.exists(path):
            raise CommandFailed(f"{path} exists; not overwriting a key", EXIT_FAILED)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    with open(public_path, "wb") as handle:
        handle.write(public_pem)
    result = {"private_key": private_path, "public_key": public_path}
    if not args.json:
        out.write(f"private key (keep it secret, mode 0600): {private_path}\n"
                  f"public key (give it to the daemon as TURSO_JWT_KEY_FILE): {public_path}\n")
    return result


def cmd_token(client: Client, args: argparse.Namespace, out: IO[str]) -> Any:
    try:
        with open(args.key, "rb") as handle:
            private_pem = handle.read()
    except OSError as error:
        raise CommandFailed(f"cannot read {args.key}: {error.strerror}", EXIT_USAGE) from None
    now = int(time.time())
    claims: dict[str, Any] = {"iat": now}
    if args.namespace:
        permission = "ro" if args.read_only else "rw"
        claims["p"] = {permission: {"ns": sorted(set(args.namespace))}}
    elif args.read_only:
        claims["a"] = "ro"
    if args.expires:
        try:
            claims["exp"] = now + int(parse_duration(args.expires))
        except ValueError as error:
            raise CommandFailed(f"--expires: {error}", EXIT_USAGE) from None
    try:
        token = mint(private_pem, claims)
    except ValueError as error:
        raise CommandFailed(f"{args.key}: {error}", EXIT_USAGE) from None
    if not args.json:
        out.write(token + "\n")
    return {"token": token, "claims": claims}


# -- the cluster ----------------------------------------------------------------


def cmd_cluster(client: Client, args: argparse.Namespace, out: IO[str]) -> Any:
    result = client.json("GET", "/v1/cluster")
    if not args.json:
        _table(result["nodes"], [("NODE", "name"), ("LIVE", "live"), ("READY", "ready"),
                                 ("NAMESPACES", "namespaces"), ("BYTES", "bytes"), ("URL", "url")], out)
    return result


def cmd_move(client: Client, args: argparse.Namespace, out: IO[str]) -> Any:
    moved = client.json("POST", f"/v1/namespaces/{_quote(args.name)}/move", {"to": args.node})
    if not args.json:
        out.write(f"moved {moved['name']} from {moved['from']} to {moved['to']} ({moved['bytes']} bytes)\n")
    return moved


def rebalance_plan(placements: dict[str, str], live: Sequence[str], drain: Sequence[str] = (),
                   sizes: dict[str, int] | None = None) -> list[tuple[str, str, str]]:
    """
    The moves that even out the live nodes: (name, from, to).  Without
    C{sizes}, by how many namespaces each owns (to within one); with them,
    by bytes: each move goes from the fullest node to the emptiest, with
    the name whose size comes closest to halving their difference, while
    that narrows it.  The nodes in C{drain} give every name away first
    and get none.  Names of nodes that are not live stay where they are
    (they cannot be moved now).
    """

    def weight(name: str) -> int:
        return 1 if sizes is None else sizes.get(name, 0)

    owned: dict[str, list[str]] = {node: [] for node in live}
    for name, node in sorted(placements.items()):
        if node in owned:
            owned[node].append(name)
    load = {node: sum(weight(name) for name in names_there) for node, names_there in owned.items()}
    plan = []
    leaving = {node: owned.pop(node) for node in drain if node in owned}
    for source, names_there in leaving.items():
        for name in sorted(names_there, key=weight, reverse=True):
            if not owned:
                break
            target = min(sorted(owned), key=lambda node: load[node])
            owned[target].append(name)
            load[target] += weight(name)
            plan.append((name, source, target))
    for _ in range(len(placements)):
        if not owned:
            break
        most = max(sorted(owned), key=lambda node: load[node])
        least = min(sorted(owned), key=lambda node: load[node])
        gap = load[most] - load[least]
        # A move of w leaves the two |gap - 2w| apart: only 0 < w < gap narrows it.
        fitting = [name for name in owned[most] if 0 < weight(name) < gap]
        if not fitting:
            break
        name = min(reversed(fitting), key=lambda name: abs(gap - 2 * weight(name)))
        owned[most].remove(name)
        owned[least].append(name)
        load[most] -= weight(name)
        load[least] += weight(name)
        plan.append((name, most, least))
    return plan


def cmd_rebalance(client: Client, args: argparse.Namespace, out: IO[str]) -> Any:
    view = client.json("GET", "/v1/cluster?placements=true")
    live = [node["name"] for node in view["nodes"] if node["live"]]
    unknown = [node for node in args.drain if node not in live]
    if unknown:
        raise CommandFailed(f"not a live node of the cluster: {', '.join(unknown)}", EXIT_USAGE)
    if args.drain and len(set(args.drain)) >= len(live):
        raise CommandFailed("draining every live node leaves nowhere to move to", EXIT_USAGE)
    sizes = None
    if args.by == "bytes":
        sizes = {entry["name"]: entry.get("bytesOnDisk", 0)
                 for entry in client.json("GET", "/v1/namespaces?bytes=true")["namespaces"]}
    plan = rebalance_plan(view.get("placements", {}), live, args.drain, sizes)
    done: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    if args.dry_run:
        for name, source, target in plan:
            if not args.json:
                out.write(f"would move {name} from {source} to {target}\n")
        plan_only: list[tuple[str, str, str]] = []
    else:
        plan_only = plan
    with _Progress(args, len(plan_only), "moving", out) as progress:
        for name, source, target in plan_only:
            progress.working_on(name)
            try:
                moved = client.json("POST", f"/v1/namespaces/{_quote(name)}/move", {"to": target})
            except CommandFailed as error:
                failed.append({"name": name, "from": source, "to": target, "error": str(error)})
                progress.done(f"could not move {name} from {source} to {target}: {error}")
                continue
            done.append(moved)
            progress.done(f"moved {name} from {source} to {target} ({moved['bytes']} bytes)")
    if not args.json:
        out.write(f"{len(plan)} move(s) planned" + ("" if args.dry_run else
                  f", {len(done)} done, {len(failed)} failed") + "\n")
    result = {"by": args.by, "plan": [{"name": n, "from": f, "to": t} for n, f, t in plan], "moved": done,
              "failed": failed}
    if failed:
        raise _Partial(result)
    return result


class _Partial(CommandFailed):
    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__(f"{len(result['failed'])} of {len(result['plan'])} moves failed")
        self.result = result


# -- wiring ---------------------------------------------------------------------


def _global_options(defaults: bool) -> argparse.ArgumentParser:
    """
    The options every command takes, before or after it: with their
    defaults on the main parser; without on each command's, so that one
    given before the command is not reset after it.
    """
    options = argparse.ArgumentParser(add_help=False)

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    options.add_argument("--url", default=default(os.environ.get("TURSO_SERVER_ADMIN_URL", DEFAULT_URL)),
                         help=f"admin API URL [env TURSO_SERVER_ADMIN_URL, default {DEFAULT_URL}]")
    options.add_argument("--token", default=default(None),
                         help="admin token [env TURSO_SERVER_ADMIN_TOKEN; prefer the env var: "
                              "options are visible in process lists]")
    options.add_argument("--output", "-o", choices=("table", "json"), default=default("table"),
                         help="table (for people, the default) or json (for scripts)")
    options.add_argument("--json", action="store_const", const="json", dest="output",
                         default=argparse.SUPPRESS, help="the same as --output json")
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turso-server-admin", parents=[_global_options(True)],
                                     description="Operate a turso-server through its admin API.",
                                     epilog="Exit status: 0 done, 1 the server refused or something failed, "
                                            "2 bad usage, 3 the server could not be reached.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # The global options work after the command too (`list --json`).
    anywhere = _global_options(False)

    def command(name: str, handler: Command, help_text: str,
                with_name: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, parents=[anywhere])
        if with_name:
            sub.add_argument("name", help="namespace name")
        sub.set_defaults(handler=handler)
        return sub

    command("list", cmd_list, "list live namespaces", with_name=False)
    command("show", _record_command("GET", ""), "show one namespace")
    command("stats", _record_command("GET", "/stats"), "files, traffic and child of one namespace")
    command("create", _record_command("POST", "/create"), "create an explicit namespace")
    command("delete", _record_command("DELETE", ""), "archive a namespace")
    command("lock", _record_command("POST", "/lock"), "exempt a namespace from the GC")
    command("unlock", _record_command("POST", "/unlock"), "subject a namespace to the GC again")
    ttl = command("ttl", _record_command("POST", "/ttl", _ttl_body), "set or clear a TTL")
    ttl.add_argument("ttl", help='a duration such as "30d", or "none" to clear it')
    unarchive = command("unarchive", _record_command("POST", "/unarchive", _unarchive_body),
                        "bring back an archived namespace")
    unarchive.add_argument("--archived-at", help="the entry's archivedAt (default: the newest)")
    unarchive.add_argument("--unlocked", action="store_true", help="do not lock it")
    archive = command("archive", cmd_archive, "list archive entries", with_name=False)
    archive.add_argument("--name", help="only this namespace's entries")
    def with_endpoint(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--endpoint-url", default=None, metavar="URL",
                         help="S3 API endpoint of an S3-compatible store (default: AWS, or AWS_ENDPOINT_URL)")

    backup = command("backup", cmd_backup, "download one namespace's backup")
    backup.add_argument("--dest", default=".",
                        help="directory (default: here), or s3://bucket/prefix (then <name>/<id>/ under it)")
    with_endpoint(backup)
    restore = command("restore", cmd_restore, "restore a namespace from a backup file")
    restore.add_argument("file", help="the SQLite backup file, or s3://bucket/key")
    with_endpoint(restore)
    restore.add_argument("--source", help="accept a backup of this other namespace")
    restore.add_argument("--allow-foreign", action="store_true", help="accept a file without identity")
    restore.add_argument("--allow-other-incarnation", action="store_true",
                         help="accept a backup of an earlier incarnation of the name")
    fork = command("fork", cmd_fork, "copy a namespace into a new one")
    fork.add_argument("target", help="the new namespace")
    backup_all = command("backup-all", cmd_backup_all,
                         "back up every namespace into DEST/<name>/<namespace id>/", with_name=False)
    backup_all.add_argument("--dest", required=True, help="a directory, or s3://bucket/prefix")
    backup_all.add_argument("--keep", type=int, default=0,
                            help="keep this many backups of each incarnation of a namespace (0: all)")
    with_endpoint(backup_all)
    restore_all = command("restore-all", cmd_restore_all,
                          "bring every namespace back from the newest backup in SOURCE (disaster recovery)",
                          with_name=False)
    restore_all.add_argument("--from", dest="source", required=True, metavar="SOURCE",
                             help="a directory or s3://bucket/prefix that backup-all wrote")
    with_endpoint(restore_all)
    config = commands.add_parser("config", help="show or change a namespace's config", parents=[anywhere],
                                 description="show (get NAME) or change (set NAME FIELD=VALUE ...) a "
                                             "namespace's config; VALUE true/false, null, a number, "
                                             "@FILE (its contents) or text")
    config.add_argument("action", choices=("get", "set"))
    config.add_argument("name", help="namespace name")
    config.add_argument("settings", nargs="*", metavar="FIELD=VALUE")
    config.set_defaults(handler=cmd_config)
    command("revoke-tokens", _record_command("POST", "/tokens/revoke"),
            "refuse every token of a namespace issued until now")
    keygen = command("keygen", cmd_keygen, "write a new Ed25519 key pair for tokens", with_name=False)
    keygen.add_argument("--out", required=True, help="directory for jwt-private.pem and jwt-public.pem")
    token = command("token", cmd_token, "print a token signed with a private key", with_name=False)
    token.add_argument("--key", required=True, help="the private key (PEM) from keygen")
    token.add_argument("--namespace", action="append", default=[],
                       help="a namespace the token opens (repeat for more; none: every namespace)")
    token.add_argument("--read-only", action="store_true", help="reads only")
    token.add_argument("--expires", help='lifetime, e.g. "1h" or "30d" (default: no expiry)')
    command("cluster", cmd_cluster, "list the nodes of the cluster", with_name=False)
    move = command("move", cmd_move, "move a namespace to another node of the cluster")
    move.add_argument("node", help="the node to move it to")
    rebalance = command("rebalance", cmd_rebalance, "even out the live nodes, by namespaces or by bytes",
                        with_name=False)
    rebalance.add_argument("--by", choices=("count", "bytes"), default="count",
                           help="even out how many namespaces each node owns (count, the default) or the "
                                "bytes each holds")
    rebalance.add_argument("--dry-run", action="store_true", help="print the plan, move nothing")
    rebalance.add_argument("--drain", action="append", default=[], metavar="NODE",
                           help="move every namespace off this node (repeat for more), to remove it")
    return parser


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None) -> int:
    out = out or sys.stdout
    parser = build_parser()
    # Shell completion: `eval "$(register-python-argcomplete turso-server-admin)"`.
    argcomplete.autocomplete(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return EXIT_USAGE if exit_.code else EXIT_OK
    # The one of --output and --json given last counts.
    args.json = args.output == "json"
    if getattr(args, "keep", 0) < 0:
        sys.stderr.write("turso-server-admin: --keep must be 0 or more\n")
        return EXIT_USAGE
    token = args.token or os.environ.get("TURSO_SERVER_ADMIN_TOKEN") or None
    client = Client(args.url, token)
    try:
        result = args.handler(client, args, out)
    except CommandFailed as error:
        sys.stderr.write(f"turso-server-admin: {error}\n")
        return error.status
    except KeyboardInterrupt:
        sys.stderr.write("turso-server-admin: interrupted\n")
        return EXIT_FAILED
    if args.json:
        out.write(json.dumps(result, indent=1) + "\n")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
