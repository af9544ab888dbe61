"""Rich tables for the operator commands (``--output table``, the default).

Each renderer takes the JSON report of :mod:`meshxl.operator.views` and prints it; nothing
here computes anything the JSON output lacks.

Everything shown comes from somewhere else: reasons operators typed, problem names
apps reported, NACK texts Envoy sent, names in etcd. None of it is rich markup: every
value becomes a :class:`rich.text.Text` in :func:`plain` (the one place cells are
made), with control characters (ANSI escapes included) shown as escapes and very long
values cut, and styles are applied to the Text, never spelled as ``[markup]``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from meshxl.model import MemberState

__all__ = ["MAX_CELL", "plain", "print_line", "render_status", "render_sync", "render_verify",
           "status_group", "status_view"]

MAX_CELL = 300
"""Characters of one value shown in a table or line (the JSON output has all of it)."""

_STATE_STYLE: dict[str, str] = {
    MemberState.READY: "green", MemberState.SYNCING: "yellow", MemberState.PROBLEM: "red",
    MemberState.LOST: "red", MemberState.ADMIN_DOWN: "magenta",
    MemberState.SITE_OFFLINE: "magenta", MemberState.OVERLOADED: "yellow",
    MemberState.ATTENTION: "bold red", MemberState.RETURNING: "cyan",
    MemberState.DEGRADED: "yellow"}


def _printable(text: str) -> str:
    """Control characters (ESC, CR, C1 controls...) as Python escapes: shown, not obeyed."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def plain(value: Any, style: str = "") -> Text:
    """A value as literal text: no markup, no emoji codes, no highlighting."""
    text = "" if value is None else str(value)
    if len(text) > MAX_CELL:
        text = f"{text[:MAX_CELL]}... ({len(text) - MAX_CELL} more characters)"
    return Text(_printable(text), style=style, no_wrap=False, end="")


def line_of(*parts: Text | str) -> Text:
    """One line of literal text (``str`` parts are the program's own words)."""
    line = Text()
    for part in parts:
        line.append(part if isinstance(part, Text) else plain(part))
    return line


def print_line(console: Console, *parts: Text | str) -> None:
    """Print :func:`line_of` the parts."""
    console.print(line_of(*parts), markup=False, highlight=False, emoji=False)


def _when(value: Any) -> str:
    """An ISO string or epoch seconds, shown as UTC to the second."""
    if value in (None, ""):
        return "-"
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")
        except (ValueError, OverflowError, OSError):
            return str(value)
    text = str(value)
    return text.replace("T", " ")[:19]


def _when_ms(value: Any) -> str:
    """Epoch seconds as UTC time of day to the millisecond."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, UTC).strftime("%H:%M:%S.%f")[:-3]
        except (ValueError, OverflowError, OSError):
            pass
    return _when(value)


def _ms(start: Any, end: Any) -> str:
    """Milliseconds from ``start`` to ``end`` (epoch seconds), or '-'."""
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (start, end)):
        return "-"
    return f"{(end - start) * 1000:.1f}"


def _dash(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _table(title: str, columns: tuple[str, ...], right: tuple[str, ...] = ()) -> Table:
    table = Table(title=plain(title), title_justify="left", highlight=False)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left")
    return table


def status_view(report: dict[str, Any]) -> list[RenderableType]:
    """``meshxl status`` as renderables: printed once, or refreshed by ``--watch``."""
    out: list[RenderableType] = []
    if report.get("model_error"):
        out.append(line_of(plain("model error:", "red"), " ", plain(report["model_error"])))
    for c in report["clusters"]:
        sticky = c["stickiness"]
        hashing = f"{sticky['algorithm']} on {sticky['key']} {sticky['on']}" if sticky else "none"
        note = _priority_note(c.get("priority"))
        table = _table(f"cluster {c['name']}  mode {c['mode']}  sticky {hashing}{note}",
                       ("member", "site", "prio", "role", "share", "state", "last change",
                        "failovers"), right=("prio", "share", "failovers"))
        for m in c["members"]:
            state = str(m["state"])
            if m["problems"]:
                state += f" ({', '.join(str(p) for p in m['problems'])})"
            judged = m.get("degraded")
            if judged and judged.get("kind") == "probe":
                state += " (probed beside the active)"
            elif judged and judged.get("kind") == "handback":
                state += " (handing the probe's sessions back)"
            elif judged and judged.get("share") is not None:
                state += f" ({judged['share'] * 100:.0f}% of its weight)"
            if m.get("warmup"):
                state += f" (warming up: {m['warmup']['fraction'] * 100:.0f}% of its weight)"
            last = m["last_change"] or {}
            change = f"{_when(last.get('at'))} {last.get('reason') or ''}".strip()
            table.add_row(
                plain(m["name"]), plain(m["site"]), plain(_dash(m["priority"])),
                plain(m["role"]), plain(f"{m['share'] * 100:.0f}%"),
                plain(state, _STATE_STYLE.get(str(m["state"]), "")), plain(change),
                plain(m["failovers"]))
        for m in c.get("departed", []):
            last = m["last_change"] or {}
            table.add_row(
                plain(m["name"]), plain("-"), plain("-"), plain("-"), plain("0%"),
                plain(f"{m['state']} (left)", _STATE_STYLE.get(str(m["state"]), "")),
                plain(f"{_when(last.get('at'))} {last.get('reason') or ''}".strip()),
                plain(m["failovers"]))
        out.append(table)
    for site, action in sorted(report["sites_offline"].items()):
        out.append(line_of(f"site {site} offline since {_when(action.get('at'))} by "
                           f"{action.get('by') or '?'}: {action.get('reason') or '-'}"))
    nodes = _table("Envoy nodes", ("node", "replica", "streams", "CDS", "EDS", "LDS", "RDS",
                                   "last NACK"))
    for n in report["nodes"]:
        nack = n["last_nack"]
        nodes.add_row(
            plain(n["node"]), plain(_dash(n["replica"])), plain(n["streams"]),
            *(plain(_dash(n["acked"].get(t))) for t in ("CDS", "EDS", "LDS", "RDS")),
            plain("-") if not nack else plain(
                f"{nack.get('type')} {_dash(nack.get('version'))}: {nack.get('error', '')}",
                "red"))
    out.append(nodes)
    failovers = report.get("failovers") or []
    if failovers:
        out.append(_failovers_table(failovers))
    for f in failovers:
        for n in f["nodes"]:
            if n["nack"]:
                out.append(line_of(plain("NACK", "red"), " failover ",
                                   plain(f"{f['cluster']}/{f['member']}"), ": ",
                                   plain(n["node"]), " rejected ", plain(_dash(f["version"])),
                                   ": ", plain(n["nack"])))
    for warning in report.get("warnings", []):
        out.append(line_of(plain("warning:", "yellow"), " ", plain(warning)))
    return out


def _priority_note(priority: dict[str, Any] | None) -> str:
    """A VS's priority list set by the operator, for ``meshxl status``'s cluster title."""
    if not priority:
        return ""
    order = priority["order"]
    if len(order) == 1:
        return (f"  active moved to {order[0]} by operator"
                + ("" if priority["applied"] else " (not live: placement's choice)"))
    return (f"  priority {', '.join(order)} set by operator"
            + ("" if priority["applied"] else " (none live: placement's order)"))


def _failovers_table(failovers: list[dict[str, Any]]) -> Table:
    table = _table("recent failovers (ms from the loss seen by the control plane)",
                   ("member", "cause", "seen at", "rebuilt", "Envoys", "converged",
                    "takeovers", "replica"),
                   right=("rebuilt", "converged", "takeovers"))
    for f in failovers:
        answered = f"{f['acked']}/{f['nodes_total']} acked"
        if f["nacked"]:
            answered += f", {f['nacked']} NACK"
        outcome = f["outcome"]
        converged = (plain(_ms(f["detected"], f["ended"]), "green") if outcome == "converged"
                     else plain(str(outcome), "red" if outcome == "timeout" else "yellow"))
        first = min((t["first"] for t in f["takeovers"] if t["first"] is not None),
                    default=None)
        takeovers = str(f["takeover_count"])
        if first is not None and f["detected"] is not None:
            takeovers += f" (first {_ms(f['detected'], first)})"
        table.add_row(
            plain(f"{f['cluster']}/{f['member']}"),
            plain(f"{_dash(f['cause'])} ({_dash(f['from_state'])} -> {_dash(f['to_state'])})"),
            plain(_when_ms(f["detected"])), plain(_ms(f["detected"], f["built"])),
            plain(answered, "red" if f["nacked"] else ""), converged, plain(takeovers),
            plain(_dash(f["replica"])))
    return table


def render_status(report: dict[str, Any], console: Console) -> None:
    for renderable in status_view(report):
        console.print(renderable, markup=False, highlight=False, emoji=False)


def status_group(report: dict[str, Any]) -> Group:
    """:func:`status_view` as one renderable."""
    return Group(*status_view(report))


def render_sync(report: dict[str, Any], console: Console) -> None:
    table = _table("state synchronization",
                   ("cluster", "member", "ready", "revision", "lag ms", "cached", "owned",
                    "takeovers", "conflicts", "undecodable", "last full sync", "errors", "age s"))
    for s in report["sidecars"]:
        lag = s["lag_seconds"]
        age = plain(_dash(s["age_seconds"]))
        if s.get("stale"):
            age = plain(f"{_dash(s['age_seconds'])} stale", "yellow")
        table.add_row(
            plain(s["cluster"]), plain(s["member"]),
            plain("yes") if s["ready"] else plain("no", "yellow"),
            plain(_dash(s["revision"])),
            plain("-" if not isinstance(lag, int | float) else f"{lag * 1000:.1f}"),
            plain(_dash(s["cached_sessions"])), plain(_dash(s["owned_sessions"])),
            plain(_dash(s["takeovers"])), plain(_dash(s["write_conflicts"])),
            plain(_dash(s.get("undecodable_sessions")))
            if not s.get("undecodable_sessions")
            else plain(str(s["undecodable_sessions"]), "red"),
            plain(_when(s["last_full_sync"])),
            plain(_dash(s["errors"]) + (f" ({s['last_error']})" if s.get("last_error") else "")),
            age)
    console.print(table)
    sharded = [s for s in report["sidecars"] if s.get("shards")]
    if sharded:
        shards = _table("session shards", ("cluster", "member", "map", "shard", "reachable",
                                           "revision", "cached", "takeovers", "conflicts"))
        for s in sharded:
            for shard in s["shards"]["shards"]:
                shards.add_row(
                    plain(s["cluster"]), plain(s["member"]),
                    plain(_dash(s["shards"].get("version"))), plain(shard["name"]),
                    plain("yes") if shard.get("reachable") else plain(
                        f"no ({_dash(shard.get('unreachable_for'))} s)", "red"),
                    plain(_dash(shard.get("revision"))),
                    plain(_dash(shard.get("cached_sessions"))),
                    plain(_dash(shard.get("takeovers"))), plain(_dash(shard.get("conflicts"))))
        console.print(shards)
    for m in report["without_statistics"]:
        print_line(console, plain(f"{m['cluster']}/{m['member']}: registered, no statistics "
                                  "published yet", "yellow"))
    for m in report.get("unregistered", []):
        print_line(console, plain(f"{m['cluster']}/{m['member']}: not registered: its sidecar "
                                  "is down or cannot reach etcd (its /readyz says which)",
                                  "yellow"))
    for warning in report.get("warnings", []):
        print_line(console, plain("warning:", "yellow"), " ", plain(warning))


def render_verify(report: dict[str, Any], console: Console) -> None:
    expected = " ".join(f"{t}={v}" for t, v in report["expected"].items())
    print_line(console, f"model versions at etcd revision {report['revision']}: "
               f"{expected or '-'}")
    table = _table("distribution verification", ("node", "replica", "CDS", "EDS", "LDS", "RDS"))
    for n in report["nodes"]:
        cells = []
        for t in ("CDS", "EDS", "LDS", "RDS"):
            v = n["types"].get(t)
            cells.append(plain("-") if v is None else plain("ok", "green")
                         if v["acked"] == v["expected"] else plain(_dash(v["acked"]), "red"))
        table.add_row(plain(n["node"]), plain(_dash(n["replica"])), *cells)
    console.print(table)
    for e in report["envoys"]:
        print_line(console, f"envoy {e['url']}: node {_dash(e['node'])}",
                   *((" ", plain(e["error"], "red")) if e["error"] else ()))
    if report["ok"]:
        print_line(console, plain("verified: every Envoy runs what the model says", "green"))
    for p in report["mismatches"]:
        print_line(console, plain("mismatch", "red"), " ", plain(p["message"]))
    for warning in report.get("warnings", []):
        print_line(console, plain("warning:", "yellow"), " ", plain(warning))


def render_vs(report: dict[str, Any], console: Console) -> None:
    """``meshxl vs list`` / ``vs show``: each pool's members and its virtual systems."""
    if report.get("model_error"):
        print_line(console, plain("model error:", "red"), " ", plain(report["model_error"]))
    for pool in report["pools"]:
        table = _table(f"pool {pool['name']}  listener {_dash(pool['listener'])}",
                       ("member", "site", "capacity", "active", "standby", "active weight",
                        "fair share", "x fair", "state"),
                       right=("capacity", "active", "standby", "active weight", "fair share",
                              "x fair"))
        for m in pool["members"]:
            ratio = m["share_ratio"]
            table.add_row(
                plain(m["name"]), plain(m["site"]), plain(m["capacity"]), plain(m["active"]),
                plain(m["standby"]), plain(m["active_weight"]), plain(f"{m['fair_share']:g}"),
                plain("-" if ratio is None else f"{ratio:.2f}"),
                plain(f"lost ({m['why']})" if m.get("why") else "lost", "red") if m["lost"]
                else plain("live", "green"))
        console.print(table)
    table = _table("virtual systems", ("vs", "pool", "mode", "weight", "active", "standby",
                                       "backups", "operator's order", "domains"),
                   right=("weight",))
    for vs in report["virtual_systems"]:
        states = vs["states"]

        def who(member: str | None, states: dict[str, str] = states) -> Text:
            if member is None:
                return plain("-")
            state = states.get(member, "")
            return plain(member if state in ("", "ready") else f"{member} ({state})",
                         _STATE_STYLE.get(state, ""))

        active, standby = who(vs["active"]), who(vs["standby"])
        priority = vs.get("priority")
        order = plain("-")
        if priority:
            if len(priority["order"]) == 1:
                active.append(" (moved by operator)" if priority["applied"]
                              else f" (moved to {priority['order'][0]}: not live)", "cyan")
            elif priority["applied"]:
                active.append(" (operator's order)", "cyan")
            if priority.get("standby_on_its_site"):
                standby.append(" (active's site)", "yellow")
            order = plain(", ".join(priority["order"])
                          + ("" if priority["applied"] else " (none live)"), "cyan")
        table.add_row(plain(vs["name"]), plain(vs["pool"]), plain(vs["mode"]),
                      plain(vs["weight"]), active, standby,
                      plain(", ".join(vs["backups"]) or "-"), order,
                      plain(" ".join(vs["domains"])))
    console.print(table)
    for warning in report.get("warnings", []):
        print_line(console, plain("warning:", "yellow"), " ", plain(warning))
