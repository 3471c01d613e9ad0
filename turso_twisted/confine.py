"""
Confinement of the children: each C{tursodb} may write only its own
namespace's files and its scratch dir, whatever SQL reaches it.

This is the second line under the statement gate (L{turso_twisted.gate}).
It uses Landlock (Linux >= 5.13) through the small C helper
C{turso-landlock} (C{confine/turso-landlock.c}, built by C{./dev setup} and
the container image), which sits in the exec chain before C{tursodb} and
costs about a millisecond per start.  Which confinement is in effect is
chosen and checked once, at start-up.
"""

from __future__ import annotations

import shutil
import subprocess

import attrs


class ConfinementUnavailable(Exception):
    """
    Confinement was required and cannot be had; the message says why.
    """


@attrs.frozen
class Confinement:
    """
    How children are confined: through C{helper} (Landlock ABI C{abi}), or
    not at all when C{helper} is C{None} (C{reason} says why).
    """

    helper: str | None = None
    abi: int = 0
    reason: str = ""

    def wrap(self, writable_files: list[str], writable_dirs: list[str], port: int | None = None,
             cwd: str | None = None, parent: int | None = None) -> list[str]:
        """
        The words that start a command confined to writing C{writable_files}
        (which must exist) and beneath C{writable_dirs}, and to binding TCP
        C{port} only and connecting nowhere (where the kernel can); in
        C{cwd}; with C{parent}, in a session of its own and killed by the
        kernel when C{parent} dies (the helper does what setsid and setpriv
        would, saving their execs).
        """
        if self.helper is None:
            return []
        words = [self.helper]
        if cwd is not None:
            words += ["--chdir", cwd]
        if parent is not None:
            words += ["--parent", str(parent)]
        for path in writable_files:
            words += ["--rw", path]
        for path in writable_dirs:
            words += ["--rwdir", path]
        if port is not None:
            words += ["--tcp-bind", str(port)]
        return [*words, "--"]

    def describe(self) -> str:
        if self.helper is None:
            return f"children are not confined: {self.reason}"
        return f"children confined by Landlock ABI {self.abi} ({self.helper})"


def choose(mode: str, helper: str) -> Confinement:
    """
    The confinement for C{mode} (C{auto}, C{landlock}, C{none}), checked
    by running the helper's probe.

    @raise ConfinementUnavailable: for C{landlock} when it cannot be had.
    """
    if mode == "none":
        return Confinement(reason="TURSO_CONFINE=none")
    found = shutil.which(helper)
    if found is None:
        reason = f"TURSO_LANDLOCK_BIN={helper!r}: no such executable"
    else:
        try:
            probe = subprocess.run([found, "--probe"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as error:
            reason = f"{found} --probe failed: {error}"
        else:
            if probe.returncode == 0 and probe.stdout.strip().isdigit():
                return Confinement(helper=found, abi=int(probe.stdout.strip()))
            reason = (probe.stderr.strip() or f"{found} --probe exited {probe.returncode}").removeprefix(
                "turso-landlock: ")
    if mode == "landlock":
        raise ConfinementUnavailable(f"TURSO_CONFINE=landlock: {reason}")
    return Confinement(reason=reason)
