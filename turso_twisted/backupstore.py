"""
Where C{turso-server-admin} keeps backups: a local directory, or an S3
bucket (AWS, or any S3-compatible store with C{--endpoint-url}), through
boto3 and its standard credentials (the environment, a profile, an
instance or pod role).

Both are laid out alike: a folder per namespace and one per incarnation
(the namespace's id), so that retention keeps the newest backups of each
incarnation and a recycled name never pushes out the last backup of the
tenant before it::

    <dest>/<name>/<namespace id>/<name>.<UTC time>.db

An S3 object carries its sha256 and the namespace's name and id as
metadata; S3 checks the sha256 as the upload arrives, and the object is
read back (its size and checksum) before the upload counts.  A download
is checked against the sha256 again.

This is the CLI's: plain blocking code.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, Protocol
from urllib.parse import urlsplit

import attrs

#: A backup file's name, as the daemon names it: <name>.<UTC time>.db.
BACKUP_FILE = re.compile(r"^(?P<name>[a-z0-9][a-z0-9_-]{0,62})\.(?P<taken>\d{8}T\d{6}\.\d{3}Z)\.db$")
#: A namespace id (a folder of the layout).
_NAMESPACE_ID = re.compile(r"^[0-9a-f]{32}$")


class StoreError(Exception):
    """A backup could not be stored, listed or fetched (the message says why)."""

    def __init__(self, message: str, damaged: bool = False) -> None:
        super().__init__(message)
        #: The backup itself is bad (it does not match its sha256), as
        #: opposed to the store being out of reach for now.
        self.damaged = damaged


#: The largest object one upload makes (S3's limit for a single PUT).
MAX_OBJECT = 5 << 30


@attrs.frozen(order=True)
class StoredBackup:
    """One backup in a store; ordered by when it was taken."""

    taken: str
    name: str
    #: The incarnation; empty for a file from before incarnation folders.
    namespace_id: str
    file_name: str
    #: Where it is: a path, or C{s3://bucket/key}.
    where: str = attrs.field(order=False)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _parsed(name: str, namespace_id: str, file_name: str, where: str) -> StoredBackup | None:
    match = BACKUP_FILE.match(file_name)
    if match is None or match.group("name") != name:
        return None
    if namespace_id and not _NAMESPACE_ID.match(namespace_id):
        return None
    return StoredBackup(match.group("taken"), name, namespace_id, file_name, where)


class Store(Protocol):
    """Backups kept somewhere."""

    def put(self, name: str, namespace_id: str, path: str, sha256: str) -> str:
        """Store the backup file at C{path} (its sha256 known); where it is now."""

    def backups(self, name: str | None = None) -> list[StoredBackup]:
        """The backups kept (of C{name} only, if given), oldest first."""

    def fetch(self, backup: StoredBackup, path: str) -> str:
        """Copy C{backup} to C{path}, checked against its sha256 if one is kept; its sha256."""

    def delete(self, backup: StoredBackup) -> None:
        """Remove C{backup}."""


@attrs.define
class LocalStore:
    """Backups in a directory."""

    root: str

    def put(self, name: str, namespace_id: str, path: str, sha256: str) -> str:
        folder = os.path.join(self.root, name, namespace_id)
        final = os.path.join(folder, os.path.basename(path))
        try:
            os.makedirs(folder, exist_ok=True)
            if os.path.abspath(path) != os.path.abspath(final):
                shutil.move(path, final)
        except OSError as error:
            raise StoreError(f"cannot keep {final}: {error.strerror or error}") from None
        return final

    def backups(self, name: str | None = None) -> list[StoredBackup]:
        found: list[StoredBackup] = []
        try:
            names = [name] if name else sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        for each in names:
            folder = os.path.join(self.root, each)
            if not os.path.isdir(folder):
                continue
            for entry in sorted(os.listdir(folder)):
                path = os.path.join(folder, entry)
                if os.path.isdir(path):
                    found += [backup for file_name in sorted(os.listdir(path))
                              if (backup := _parsed(each, entry, file_name, os.path.join(path, file_name)))]
                elif backup := _parsed(each, "", entry, path):
                    found.append(backup)
        return sorted(found)

    def fetch(self, backup: StoredBackup, path: str) -> str:
        try:
            shutil.copyfile(backup.where, path)
            return sha256_of(path)
        except OSError as error:
            raise StoreError(f"cannot read {backup.where}: {error.strerror or error}") from None

    def delete(self, backup: StoredBackup) -> None:
        try:
            os.unlink(backup.where)
        except OSError as error:
            raise StoreError(f"cannot delete {backup.where}: {error.strerror or error}") from None


@attrs.define
class S3Store:
    """Backups in an S3 bucket, under a prefix."""

    bucket: str
    prefix: str
    client: Any

    @classmethod
    def open(cls, url: str, endpoint_url: str | None = None) -> S3Store:
        """The store at C{s3://bucket/prefix}."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise StoreError(f"{url!r} is not an s3://bucket/prefix URL")
        import boto3  # type: ignore[import-untyped]  # only when S3 is used
        from botocore.config import Config  # type: ignore[import-untyped]

        client = boto3.client("s3", endpoint_url=endpoint_url or None,
                              config=Config(retries={"max_attempts": 5, "mode": "standard"}))
        return cls(parts.netloc, parts.path.strip("/"), client)

    def _key(self, *parts: str) -> str:
        return "/".join(part for part in (self.prefix, *parts) if part)

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def put(self, name: str, namespace_id: str, path: str, sha256: str) -> str:
        key = self._key(name, namespace_id, os.path.basename(path))
        size = os.path.getsize(path)
        if size > MAX_OBJECT:
            raise StoreError(f"{os.path.basename(path)} is {size} bytes: over the 5 GiB of one S3 upload "
                             "(keep it in a directory destination)")
        checksum = base64.b64encode(bytes.fromhex(sha256)).decode()
        metadata = {"sha256": sha256, "namespace": name, "namespace-id": namespace_id}
        try:
            with open(path, "rb") as handle:
                # S3 checks the body against ChecksumSHA256 as it arrives.
                self.client.put_object(Bucket=self.bucket, Key=key, Body=handle, ContentLength=size,
                                       ChecksumSHA256=checksum, Metadata=metadata,
                                       ContentType="application/vnd.sqlite3")
            stored = self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except _s3_errors() as error:
            raise StoreError(f"cannot upload to {self._where(key)}: {error}") from None
        kept = stored.get("ChecksumSHA256")
        if stored.get("ContentLength") != size or stored.get("Metadata", {}).get("sha256") != sha256 \
                or (kept is not None and kept.split("-")[0] != checksum):
            raise StoreError(f"{self._where(key)} does not read back as uploaded "
                             f"({stored.get('ContentLength')} bytes, checksum {kept})")
        return self._where(key)

    def backups(self, name: str | None = None) -> list[StoredBackup]:
        found = []
        listed = self._key(name) + "/" if name else (self.prefix + "/" if self.prefix else "")
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                            Prefix=listed):
                for item in page.get("Contents", []):
                    key = item["Key"]
                    parts = key[len(self.prefix) + 1 if self.prefix else 0:].split("/")
                    if len(parts) == 3:
                        backup = _parsed(parts[0], parts[1], parts[2], self._where(key))
                    elif len(parts) == 2:
                        backup = _parsed(parts[0], "", parts[1], self._where(key))
                    else:
                        continue
                    if backup is not None:
                        found.append(backup)
        except _s3_errors() as error:
            raise StoreError(f"cannot list s3://{self.bucket}/{listed}: {error}") from None
        return sorted(found)

    def fetch(self, backup: StoredBackup, path: str) -> str:
        key = backup.where[len(f"s3://{self.bucket}/"):]
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
            expected = answer.get("Metadata", {}).get("sha256")
            digest = hashlib.sha256()
            with open(path, "wb") as handle:
                for block in answer["Body"].iter_chunks(1 << 20):
                    digest.update(block)
                    handle.write(block)
        except _s3_errors() as error:
            raise StoreError(f"cannot download {backup.where}: {error}") from None
        if expected and digest.hexdigest() != expected:
            raise StoreError(f"{backup.where} does not match its sha256 (got {digest.hexdigest()}, "
                             f"stored {expected})", damaged=True)
        return digest.hexdigest()

    def delete(self, backup: StoredBackup) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=backup.where[len(f"s3://{self.bucket}/"):])
        except _s3_errors() as error:
            raise StoreError(f"cannot delete {backup.where}: {error}") from None


def _s3_errors() -> tuple[type[Exception], ...]:
    """What boto3 raises (imported only when S3 is used)."""
    from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

    return BotoCoreError, ClientError


def open_store(destination: str, endpoint_url: str | None = None) -> Store:
    """The store C{destination} names: C{s3://bucket/prefix}, or a directory."""
    if destination.startswith("s3://"):
        return S3Store.open(destination, endpoint_url)
    return LocalStore(destination)


def beyond_retention(backups: Iterable[StoredBackup], keep: int) -> list[StoredBackup]:
    """
    The backups past the newest C{keep} of each incarnation (of each name):
    the ones to delete.  The newest of an incarnation is never among them.
    """
    if keep <= 0:
        return []
    incarnations: dict[tuple[str, str], list[StoredBackup]] = defaultdict(list)
    for backup in backups:
        incarnations[(backup.name, backup.namespace_id)].append(backup)
    return [old for kept in incarnations.values() for old in sorted(kept)[:-keep]]
