"""
The SQL the daemon sends a child on its own (backups, replays): Hrana
pipeline requests through the child's channel, results checked.
"""

from __future__ import annotations

import json
from typing import Any

from .channel import BackendChannel


class ChildSQLError(Exception):
    """
    A child refused a statement we sent it ourselves (not a client's).
    """

    #: How tursodb (and SQLite) say a write failed for want of space.
    _NO_SPACE = ("no storage space", "no space left on device", "database or disk is full")

    @property
    def out_of_space(self) -> bool:
        """Whether the child failed because the volume is full (the operator's to fix)."""
        text = str(self).lower()
        return any(marker in text for marker in self._NO_SPACE)


async def pipeline(channel: BackendChannel, requests: list[dict[str, Any]],
                   timeout: float | None = None) -> list[dict[str, Any]]:
    """
    Send Hrana C{requests} (C{execute} or C{batch}) to the child and return
    their results.

    @raise ChildSQLError: if any statement failed.
    """
    body = json.dumps({"requests": requests}).encode("utf-8")
    response = await channel.request(b"POST", b"/v2/pipeline",
                                     [(b"Content-Type", b"application/json")], body, timeout)
    if response.code != 200:
        raise ChildSQLError(f"status {response.code}: {response.body[:300].decode('utf-8', 'replace')}")
    out = []
    for result in json.loads(response.body)["results"]:
        if result.get("type") != "ok":
            raise ChildSQLError(result.get("error", {}).get("message", "unknown error"))
        answer = result["response"]
        if answer.get("type") == "batch":
            errors = [e for e in answer["result"].get("step_errors", []) if e]
            if errors:
                raise ChildSQLError(errors[0].get("message", "unknown error"))
        out.append(answer.get("result", {}))
    return out


def execute(sql: str, args: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "execute", "stmt": {"sql": sql, "args": args or [], "want_rows": True}}
