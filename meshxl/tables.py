"""Rich tables for the operator commands (``--output table``, the default).

Each renderer takes the JSON report of :mod:`meshxl.observe` and prints it; nothing
here computes anything the JSON output lacks.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from meshxl.model import MemberState

__all__ = ["render_status", "render_sync", "render_verify"]

_STATE_STYLE: dict[str, str] = {
    MemberState.READY: "green", MemberState.SYNCING: "yellow", MemberState.PROBLEM: "red",
    MemberState.LOST: "red", MemberState.ADMIN_DOWN: "magenta",
    MemberState.SITE_OFFLINE: "magenta"}


def _when(value: Any) -> str:
    """An ISO string or epoch seconds, shown as UTC to the second."""
    if value in (None, ""):
        return "-"
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")
    text = str(value)
    return text.replace("T", " ")[:19]


def _dash(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def render_status(report: dict[str, Any], console: Console) -> None:
    if report.get("model_error"):
        console.print(f"[red]model error:[/red] {report['model_error']}")
    for c in report["clusters"]:
        sticky = c["stickiness"]
        hashing = f"{sticky['algorithm']} on {sticky['key']} {sticky['on']}" if sticky else "none"
        table = Table(title=f"cluster {c['name']}  mode {c['mode']}  sticky {hashing}",
                      title_justify="left")
        for column in ("member", "site", "prio", "role", "share", "state", "last change",
                       "failovers"):
            table.add_column(column, justify="right" if column in ("prio", "share",
                                                                     "failovers") else "left")
        for m in c["members"]:
            state = m["state"]
            if m["problems"]:
                state += f" ({', '.join(m['problems'])})"
            last = m["last_change"]
            change = f"{_when(last.get('at'))} {last.get('reason') or ''}".strip()
            table.add_row(
                m["name"], m["site"], _dash(m["priority"]), m["role"],
                f"{m['share'] * 100:.0f}%", f"[{_STATE_STYLE.get(m['state'], '')}]{state}",
                change, str(m["failovers"]))
        console.print(table)
    if report["sites_offline"]:
        for site, action in sorted(report["sites_offline"].items()):
            console.print(f"site {site} offline since {_when(action.get('at'))} by "
                          f"{action.get('by') or '?'}: {action.get('reason') or '-'}")
    nodes = Table(title="Envoy nodes", title_justify="left")
    for column in ("node", "replica", "streams", "CDS", "EDS", "LDS", "RDS", "last NACK"):
        nodes.add_column(column)
    for n in report["nodes"]:
        nack = n["last_nack"]
        nodes.add_row(
            n["node"], _dash(n["replica"]), str(n["streams"]),
            *(_dash(n["acked"].get(t)) for t in ("CDS", "EDS", "LDS", "RDS")),
            "-" if not nack else f"[red]{nack['type']} {_dash(nack.get('version'))}: "
            f"{nack.get('error', '')}")
    console.print(nodes)


def render_sync(report: dict[str, Any], console: Console) -> None:
    table = Table(title="state synchronization", title_justify="left")
    for column in ("cluster", "member", "ready", "revision", "lag ms", "cached", "owned",
                   "takeovers", "conflicts", "undecodable", "last full sync", "errors",
                   "age s"):
        table.add_column(column)
    for s in report["sidecars"]:
        lag = s["lag_seconds"]
        table.add_row(
            s["cluster"], s["member"], "yes" if s["ready"] else "[yellow]no",
            _dash(s["revision"]), "-" if lag is None else f"{lag * 1000:.1f}",
            _dash(s["cached_sessions"]), _dash(s["owned_sessions"]), _dash(s["takeovers"]),
            _dash(s["write_conflicts"]),
            _dash(s.get("undecodable_sessions")) if not s.get("undecodable_sessions")
            else f"[red]{s['undecodable_sessions']}", _when(s["last_full_sync"]),
            _dash(s["errors"]) + (f" ({s['last_error']})" if s.get("last_error") else ""),
            _dash(s["age_seconds"]))
    console.print(table)
    for m in report["without_statistics"]:
        console.print(f"[yellow]{m['cluster']}/{m['member']}: registered, no statistics "
                      "published yet")


def render_verify(report: dict[str, Any], console: Console) -> None:
    expected = " ".join(f"{t}={v}" for t, v in report["expected"].items())
    console.print(f"model versions at etcd revision {report['revision']}: {expected or '-'}")
    table = Table(title="distribution verification", title_justify="left")
    for column in ("node", "replica", "CDS", "EDS", "LDS", "RDS"):
        table.add_column(column)
    for n in report["nodes"]:
        cells = []
        for t in ("CDS", "EDS", "LDS", "RDS"):
            v = n["types"].get(t)
            cells.append("-" if v is None else "[green]ok" if v["acked"] == v["expected"]
                         else f"[red]{_dash(v['acked'])}")
        table.add_row(n["node"], _dash(n["replica"]), *cells)
    console.print(table)
    for e in report["envoys"]:
        console.print(f"envoy {e['url']}: node {_dash(e['node'])}"
                      + (f" [red]{e['error']}" if e["error"] else ""))
    if report["ok"]:
        console.print("[green]verified: every Envoy runs what the model says")
    for p in report["mismatches"]:
        console.print(f"[red]mismatch[/red] {p['message']}")
