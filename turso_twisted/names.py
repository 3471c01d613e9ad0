"""
Namespace names: the one gate between a request and a file path.

A name is valid only if it matches C{^[a-z0-9][a-z0-9_-]{0,62}$} exactly, as
raw bytes from the request line: no percent-decoding happens before the check,
so C{%2e%2e}, dots, slashes, upper case and non-ASCII never become names.
Files of a namespace are derived from a valid name and the data dir alone.
"""

from __future__ import annotations

import os
import re

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_NAME_BYTES = re.compile(rb"[a-z0-9][a-z0-9_-]{0,62}")

#: The files tursodb keeps for one database, by suffix after C{<name>}.
DATA_FILE_SUFFIXES = (".db", ".db-wal", ".db-log", ".db-tshm")


class InvalidName(ValueError):
    """
    The text is not a namespace name; the message says why.
    """


def validate(name: str | bytes) -> str:
    """
    Return C{name} as text if it is a valid namespace name.

    @raise InvalidName: otherwise.
    """
    if isinstance(name, bytes):
        if _NAME_BYTES.fullmatch(name) is None:
            raise InvalidName(_explain(name.decode("utf-8", "replace")))
        return name.decode("ascii")
    if NAME_PATTERN.fullmatch(name) is None:
        raise InvalidName(_explain(name))
    return name


def is_valid(name: str | bytes) -> bool:
    try:
        validate(name)
    except InvalidName:
        return False
    return True


def _explain(name: str) -> str:
    shown = name if len(name) <= 80 else name[:77] + "..."
    if not name:
        return "namespace name is empty"
    if name.startswith("_"):
        return f"namespace name {shown!r} is reserved: names starting with '_' are internal"
    if len(name) > 63:
        return f"namespace name {shown!r} is longer than 63 characters"
    return (
        f"namespace name {shown!r} is invalid: use 1-63 characters of a-z, 0-9, "
        "'_' and '-', starting with a letter or digit"
    )


def of_target(target: bytes) -> str | None:
    """
    The namespace a data-port request target (C{/<name>/...}) names, or
    C{None} if it names none validly (the data plane then refuses it).
    """
    first = target.partition(b"?")[0][1:].partition(b"/")[0]
    return first.decode("ascii") if target.startswith(b"/") and is_valid(first) else None


def data_files(data_dir: str, name: str) -> list[str]:
    """
    The paths of every file tursodb may keep for C{name}, in C{data_dir}.
    """
    validate(name)
    return [os.path.join(data_dir, name + suffix) for suffix in DATA_FILE_SUFFIXES]


def data_file_sizes(data_dir: str, name: str) -> dict[str, int]:
    """
    The size of each of C{name}'s data files that exists, by file name.
    """
    sizes = {}
    for path in data_files(data_dir, name):
        try:
            sizes[os.path.basename(path)] = os.path.getsize(path)
        except FileNotFoundError:
            continue
    return sizes


def name_of_data_file(file_name: str) -> str | None:
    """
    The namespace whose data file C{file_name} would be, or C{None}.
    """
    for suffix in DATA_FILE_SUFFIXES:
        if file_name.endswith(suffix):
            stem = file_name[: -len(suffix)]
            return stem if is_valid(stem) else None
    return None


def db_path(data_dir: str, name: str) -> str:
    return data_files(data_dir, name)[0]
