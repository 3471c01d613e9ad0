"""
What the admin API shows of a namespace: its record with runtime fields
(L{NamespaceStats.describe}) and what it costs and does
(L{NamespaceStats.stats}: files, traffic since start, its child).

Traffic is counted per namespace as data requests finish: three integers,
no lock, no write.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime

from . import names
from .errors import not_found
from .state import NamespaceRecord, StateStore
from .supervisor import Supervisor


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@attrs.define(eq=False)
class NamespaceStats:
    clock: IReactorTime
    data_dir: str
    state: StateStore
    supervisor: Supervisor
    #: name -> [requests, bytes in, bytes out] since the daemon started.
    usage: dict[str, list[int]] = attrs.field(factory=dict)

    def count(self, name: str, received: int, sent: int) -> None:
        self.add(name, 1, received, sent)

    def add(self, name: str, requests: int, received: int, sent: int) -> None:
        """Count C{requests} (served by a data worker, say)."""
        counts = self.usage.get(name)
        if counts is None:
            counts = self.usage[name] = [0, 0, 0]
        counts[0] += requests
        counts[1] += received
        counts[2] += sent

    def describe(self, record: NamespaceRecord) -> dict[str, Any]:
        """
        A record as the admin API shows it: stored fields plus runtime ones.
        """
        child = self.supervisor.running(record.name)
        out = record.to_json()
        out["config"] = record.config.to_json()
        out["running"] = child is not None
        out["port"] = child.port if child else None
        out["pid"] = child.pid if child else None
        # Client ids are for the daemon; the API shows how many there are.
        out["replicas"] = len(out.pop("clients"))
        out["retiredReplicas"] = len(out.pop("retiredClients"))
        del out["archiving"], out["installing"]
        return out

    def stats(self, name: str) -> dict[str, Any]:
        """
        What one namespace costs and does: files, traffic since start, child.

        @raise NotFound: if C{name} is not live.
        """
        record = self.state.records.get(name)
        if record is None:
            raise not_found(name)
        files = names.data_file_sizes(self.data_dir, name)
        requests, received, sent = self.usage.get(name, [0, 0, 0])
        child = self.supervisor.running(name)
        return {
            "name": name,
            "files": files,
            "bytesOnDisk": sum(files.values()),
            "requests": requests,
            "bytesIn": received,
            "bytesOut": sent,
            "lastAccessAt": record.to_json()["lastAccessAt"],
            "running": child is not None,
            "pid": child.pid if child else None,
            "port": child.port if child else None,
            "uptimeSeconds": round(self.clock.seconds() - child.started_at, 3) if child else None,
            "rssBytes": rss_bytes(child.pid) if child and child.pid else None,
            "queued": child.channel.queued if child else 0,
        }
