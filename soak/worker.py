"""
One soak worker: a real pyturso embedded replica that writes uniquely keyed
rows into one namespace through the daemon and pushes them, for ever, until
told to drain.

    python soak/worker.py URL TOKEN NAMESPACE WORKDIR

A key is written to ``attempted`` before its row is inserted and to
``acknowledged`` only after a push that carried it returned: a push pushes
every local change, so one success acknowledges everything pending.  The
orchestrator (soak/run.py) reads both files; the second one's size is also
how it sees that this worker makes progress.  When the file ``drain``
appears in WORKDIR the worker stops inserting, pushes until a push succeeds
(or ``drain`` holds a deadline that passes), prints one JSON line of counts
and exits.  A failed push is retried, never papered over: the replica is
never re-bootstrapped, because a namespace that refuses its own replica is
a fault the soak must report, not hide.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections import Counter
from contextlib import suppress
from typing import Any

ROWS_PER_PUSH = 3
PULL_EVERY = 10
#: An application's pace, not a benchmark's: tursodb's WAL never shrinks
#: (~9 KB per push), and the disk fault's volume is small.
PAUSE = 0.02


def error_kind(error: BaseException) -> str:
    """A short, stable label for an error, for the counts."""
    text = str(error).lower()
    for marker in ("504", "503", "507", "500", "502", "409", "404", "403", "401", "400",
                   "connection refused", "connection reset", "timed out", "stale", "storage space"):
        if marker in text:
            return f"{type(error).__name__}:{marker}"
    return type(error).__name__


def open_replica(url: str, token: str, path: str) -> Any:
    import turso.sync

    conn = turso.sync.connect(path, remote_url=url, auth_token=token)
    conn.execute("CREATE TABLE IF NOT EXISTS ledger (key TEXT NOT NULL, ns TEXT NOT NULL, "
                 "seq INTEGER NOT NULL)")
    conn.commit()
    return conn


def main() -> None:
    url, token, namespace, workdir = sys.argv[1:5]
    replica_path = os.path.join(workdir, "replica", "replica.db")
    os.makedirs(os.path.dirname(replica_path), exist_ok=True)
    drain_path = os.path.join(workdir, "drain")
    attempted = open(os.path.join(workdir, "attempted"), "a", encoding="utf-8")
    acknowledged = open(os.path.join(workdir, "acknowledged"), "a", encoding="utf-8")
    errors: Counter[str] = Counter()
    first_error: dict[str, str] = {}
    pending: list[str] = []
    seq = pushes = pulls = 0
    drained = False
    conn = None
    backoff = 0.05

    def failed(error: BaseException) -> None:
        nonlocal backoff
        kind = error_kind(error)
        errors[kind] += 1
        first_error.setdefault(kind, "".join(traceback.format_exception_only(type(error), error)).strip())
        time.sleep(backoff)
        backoff = min(backoff * 2, 0.5)

    while True:
        draining = os.path.exists(drain_path)
        if draining:
            with open(drain_path, encoding="utf-8") as handle:
                deadline = float(handle.read().strip() or "0")
            if time.time() > deadline:
                break
        if conn is None:
            try:
                conn = open_replica(url, token, replica_path)
            except Exception as error:
                failed(error)
                continue
        if not draining:
            # The pid keeps keys unique when the soak restarts a worker.
            keys = [f"{namespace}/{os.getpid()}/{seq + i}" for i in range(ROWS_PER_PUSH)]
            attempted.write("".join(f"{key}\n" for key in keys))
            attempted.flush()
            try:
                for i, key in enumerate(keys):
                    conn.execute("INSERT INTO ledger (key, ns, seq) VALUES (?, ?, ?)",
                                 (key, namespace, seq + i))
                conn.commit()
            except Exception as error:
                # The replica itself failed: open it again (its pending rows stay in it).
                failed(error)
                with suppress(Exception):
                    conn.close()
                conn = None
                continue
            seq += ROWS_PER_PUSH
            pending.extend(keys)
        elif not pending:
            drained = True
            break
        try:
            conn.push()
        except Exception as error:
            failed(error)
            continue
        pushes += 1
        backoff = 0.05
        acknowledged.write("".join(f"{key}\n" for key in pending))
        acknowledged.flush()
        pending.clear()
        time.sleep(PAUSE)
        if pushes % PULL_EVERY == 0:
            try:
                conn.pull()
                pulls += 1
            except Exception as error:
                failed(error)
    print(json.dumps({"namespace": namespace, "attempted": seq, "pushes": pushes, "pulls": pulls,
                      "drained": drained, "pending": len(pending), "errors": dict(errors),
                      "first_error": first_error}), flush=True)


if __name__ == "__main__":
    main()
