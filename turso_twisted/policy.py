"""
What one data request may do to its namespace: the token's access (see
L{turso_twisted.tokens}) meets the namespace's own config (see
L{turso_twisted.nsconfig}).  Checked after the gate has read the request's
statements (so a write is known) and before anything is created or sent.
"""

from __future__ import annotations

from . import names
from .errors import Forbidden, not_found
from .state import NamespaceRecord
from .tokens import Access


def authorize(access: Access, name: str, record: NamespaceRecord | None, writes: bool,
              data_dir: str) -> None:
    """
    @param writes: whether the request changes the database (a push, an
        C{INSERT}, any statement the gate does not classify as a read).

    @raise NotFound: for an unknown name the token may not create.
    @raise Forbidden: for a namespace the token does not open, a write with
        read-only access, or one the namespace's config blocks.
    """
    if record is None:
        # Only write access to the very name provisions it; anyone else
        # learns nothing beyond "no such namespace".
        if not access.can_write(name):
            raise not_found(name)
        return
    if not access.can_read(name):
        raise Forbidden("forbidden", f"this token does not open namespace {name!r}")
    config = record.config
    reason = f": {config.block_reason}" if config.block_reason else ""
    if config.block_reads:
        raise Forbidden("reads_blocked", f"namespace {name!r} is blocked{reason}")
    if not writes:
        return
    if not access.can_write(name):
        raise Forbidden("forbidden", f"read-only access to namespace {name!r}: writes are refused")
    if config.block_writes:
        raise Forbidden("writes_blocked", f"writes to namespace {name!r} are blocked{reason}")
    if config.max_db_size is not None:
        size = sum(names.data_file_sizes(data_dir, name).values())
        if size > config.max_db_size:
            raise Forbidden("max_db_size_exceeded",
                            f"namespace {name!r} holds {size} bytes, over its max_db_size of "
                            f"{config.max_db_size}: writes are refused, reads go on")
