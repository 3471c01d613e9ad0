"""
Failpoints: named places where the daemon can be made to die on purpose,
as a SIGKILL would, so that tests can stop a move (or anything else that
must survive a crash) at exactly one step and check what is left.

C{TURSO_FAILPOINTS} (comma-separated names) arms them; it is read once at
start-up and is for tests only: an operator never sets it.
"""

from __future__ import annotations

import os
import sys

_ARMED = frozenset(name.strip() for name in os.environ.get("TURSO_FAILPOINTS", "").split(",") if name.strip())


def failpoint(name: str) -> None:
    """Die here, at once and without cleaning up, if C{name} is armed."""
    if name in _ARMED:
        sys.stderr.write(f"turso-server: failpoint {name}: exiting as if killed\n")
        sys.stderr.flush()
        os._exit(137)
