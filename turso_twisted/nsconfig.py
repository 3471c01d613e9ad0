"""
A namespace's own settings, shaped like sqld's namespace config: reads or
writes blocked (with a reason the refusals carry), a size past which
writes are refused, a key of its own for tokens, and a date before which
its tokens no longer count (revocation without a deny list).

One schema for the admin API, the state file and archive manifests.
"""

from __future__ import annotations

import functools
from typing import Any

import attrs

from .config import parse_size
from .timefmt import from_rfc3339, to_rfc3339
from .tokens import KeySet, load_keys

#: The fields, as the API and the state file name them.
FIELDS = ("block_reads", "block_writes", "block_reason", "max_db_size", "jwt_key", "tokens_not_before")


@functools.lru_cache(maxsize=1024)
def _keys(text: str) -> KeySet:
    return load_keys(text)


@attrs.frozen
class NamespaceConfig:
    block_reads: bool = False
    block_writes: bool = False
    block_reason: str | None = None
    #: Bytes; once the namespace's files are larger, writes are refused.
    max_db_size: int | None = None
    #: Public key(s) in sqld's formats that replace the server's for this namespace.
    jwt_key: str | None = None
    #: Tokens issued (C{iat}) before this time, or without C{iat}, are refused here.
    tokens_not_before: float | None = None

    @property
    def keys(self) -> KeySet | None:
        return None if self.jwt_key is None else _keys(self.jwt_key)

    def to_json(self) -> dict[str, Any]:
        not_before = self.tokens_not_before
        return {
            "block_reads": self.block_reads,
            "block_writes": self.block_writes,
            "block_reason": self.block_reason,
            "max_db_size": self.max_db_size,
            "jwt_key": self.jwt_key,
            "tokens_not_before": None if not_before is None else to_rfc3339(not_before),
        }

    @classmethod
    def from_json(cls, data: Any) -> NamespaceConfig:
        """
        @raise ValueError: naming the field that is wrong.
        """
        if not isinstance(data, dict):
            raise ValueError("config must be an object")
        return cls().updated(data)

    def updated(self, changes: dict[str, Any]) -> NamespaceConfig:
        """
        This config with C{changes} (fields as in L{to_json}; C{null} resets
        one) applied.

        @raise ValueError: for an unknown field or a bad value.
        """
        unknown = set(changes) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(FIELDS)})")
        values: dict[str, Any] = {}
        for name in ("block_reads", "block_writes"):
            if name in changes:
                value = changes[name]
                if value is not None and not isinstance(value, bool):
                    raise ValueError(f"{name} must be true or false")
                values[name] = bool(value)
        if "block_reason" in changes:
            reason = changes["block_reason"]
            if reason is not None and (not isinstance(reason, str) or len(reason) > 500
                                       or not reason.isprintable()):
                raise ValueError("block_reason must be printable text of at most 500 characters")
            values["block_reason"] = reason or None
        if "max_db_size" in changes:
            values["max_db_size"] = _size(changes["max_db_size"])
        if "jwt_key" in changes:
            key = changes["jwt_key"]
            if key is not None:
                if not isinstance(key, str):
                    raise ValueError("jwt_key must be a public key (PEM or URL-safe base64) or null")
                try:
                    _keys(key.strip())
                except ValueError as error:
                    raise ValueError(f"jwt_key: {error}") from None
                key = key.strip()
            values["jwt_key"] = key
        if "tokens_not_before" in changes:
            moment = changes["tokens_not_before"]
            if moment is not None:
                if not isinstance(moment, str):
                    raise ValueError("tokens_not_before must be an RFC 3339 timestamp or null")
                moment = from_rfc3339(moment)
            values["tokens_not_before"] = moment
        return attrs.evolve(self, **values)


def _size(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("max_db_size must be a byte count (4096, \"100MB\") or null")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        try:
            size = parse_size(value)
        except ValueError:
            raise ValueError("max_db_size must be a byte count (4096, \"100MB\") or null") from None
    else:
        raise ValueError("max_db_size must be a byte count (4096, \"100MB\") or null")
    if size <= 0:
        raise ValueError("max_db_size must be positive (null for no limit)")
    return size
