"""The recent failovers, as ``meshxl status`` and the live view show them: the control
plane's timeline of each (loss seen, rebuild, push, every Envoy's answer) joined with
the session takeovers the new owners' sidecars published for it, traced or not.
"""

from __future__ import annotations

from typing import Any

from meshxl.operator.views.read import MeshRead, count, number, text

__all__ = ["failover_report"]


def _takeovers(read: MeshRead, cluster: str, failover: str | None) -> list[dict[str, Any]]:
    """What each sidecar of ``cluster`` published about the takeovers it joined to the
    failover with id ``failover``."""
    out: list[dict[str, Any]] = []
    if not failover:
        return out
    for (c, member), stats in sorted(read.sync.items()):
        entries = stats.get("failover_takeovers")
        if c != cluster or not isinstance(entries, list):
            continue
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("failover") != failover:
                continue
            times = entry.get("times")
            pairs = [[number(p[0]), number(p[1])] for p in times
                     if isinstance(p, list) and len(p) == 2] if isinstance(times, list) else []
            out.append({"member": member, "count": count(entry.get("count")),
                        "first": number(entry.get("first")),
                        "last": number(entry.get("last")),
                        "times": [p for p in pairs if None not in p]})
    return out


def failover_report(read: MeshRead, cluster: str | None = None) -> list[dict[str, Any]]:
    """The recent failovers, newest first: each one's timeline as the control plane
    followed it (loss seen, rebuild, push, every Envoy's answer with NACK texts) and
    the session takeovers the new owners' sidecars joined to it."""
    out = []
    for (c, member), record in read.failovers.items():
        if cluster is not None and c != cluster:
            continue
        detected = number(record.get("detected")) or number(record.get("at"))
        ended = number(record.get("ended"))
        rows = record.get("nodes")
        nodes = []
        for row in rows if isinstance(rows, list) else []:
            if isinstance(row, dict) and text(row.get("node")) is not None:
                nodes.append({"node": row["node"], "pushed": number(row.get("pushed")),
                              "sent": number(row.get("sent")),
                              "answered": number(row.get("answered")),
                              "nack": text(row.get("nack"))})
        takeovers = _takeovers(read, c, text(record.get("id"))
                               or text(record.get("traceparent")))
        outcome = text(record.get("outcome")) or "open"
        out.append({
            "cluster": c, "member": member, "cause": text(record.get("cause")),
            "from_state": text(record.get("from_state")),
            "to_state": text(record.get("to_state")),
            "replica": text(record.get("replica")), "version": text(record.get("version")),
            "revision": number(record.get("revision")), "detected": detected,
            "rebuild": number(record.get("rebuild")), "built": number(record.get("built")),
            "ended": ended, "outcome": outcome,
            "converged_ms": None if ended is None or detected is None
            else round((ended - detected) * 1000, 1),
            "nodes_total": count(record.get("nodes_total")),
            "acked": count(record.get("acked")), "nacked": count(record.get("nacked")),
            "nodes": nodes, "takeovers": takeovers,
            "takeover_count": sum(t["count"] for t in takeovers),
        })
    out.sort(key=lambda f: (-(f["detected"] or 0.0), f["cluster"], f["member"]))
    return out
