"""Text from operators, apps, etcd and Envoy is shown literally by every table renderer:
never read as rich markup, never passed to the terminal as control sequences."""

from __future__ import annotations

import io
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from meshxl.model import AdminAction, Registration, RuntimeState
from meshxl.operator.tables import (
    MAX_CELL,
    plain,
    render_status,
    render_sync,
    render_verify,
    status_group,
)
from meshxl.operator.views import MeshRead, status_report, sync_report, verify_report
from meshxl.xds.types import CLUSTER, ENDPOINT
from tests.unit.test_operator_views import MODEL, expected_versions, live_from_model, read_of

MARKUP = ["[/red]", "[red]", "[/]", "[bold", "[link=http://x]y[/link]", "x[/x]y",
          ":smile:", "\x1b[31mred\x1b[0m", "\x1b]8;;http://x\x07y", "\r\n", "a\u202eb",
          "[" * 50, "\\[red]", "[red]" * 3 + "[/]" * 5, "\x00\x9b2J", "1.2.3.4 [::1]"]
hostile = st.one_of(
    st.sampled_from(MARKUP),
    st.text(max_size=60),
    st.text(alphabet=st.sampled_from("[]/\\:=ab \x1b\n"), max_size=60),
    st.builds(lambda s, n: s * n, st.sampled_from(["[x]", "é", "\u4e16", "[/]"]),
              st.integers(100, 2000)),
)


def render(fn: Any, report: dict[str, Any]) -> str:
    out = io.StringIO()
    fn(report, Console(file=out, width=100_000, soft_wrap=False, color_system=None))
    return out.getvalue()


def shown(value: str) -> str:
    """What a value looks like in a table: printable, cut at MAX_CELL."""
    return plain(value).plain


def check(text: str, *values: str) -> None:
    assert "\x1b" not in text and "\r" not in text
    for value in values:
        assert shown(value)[:MAX_CELL // 2] in text, (value, text)


@settings(max_examples=60, deadline=None)
@given(reason=hostile, by=hostile, nack=hostile, node=hostile, problem=hostile)
def test_status_shows_operator_and_envoy_text_literally(
        reason: str, by: str, nack: str, node: str, problem: str) -> None:
    state = RuntimeState(
        registrations={("web", "a"): Registration("127.0.0.1", 8001, site="dc1",
                                                  problems=(problem,)),
                       ("web", "b"): Registration("127.0.0.1", 8002, site="dc2")},
        members_down={("web", "a"): AdminAction(reason, by, "2026-01-01T00:00:00")},
        sites_offline={"dc2": AdminAction(reason, by, 1.0)})
    read = read_of(state, nodes={node: {
        "streams": 1, "replica": by, "types": {CLUSTER: {"acked_version": reason}},
        "last_nack": {"type_url": CLUSTER, "version": "v1", "error": nack}}})
    text = render(render_status, status_report(read))
    check(text, nack, node)
    assert shown(reason)[:40] in text  # the reason shares a cell with the time


@settings(max_examples=40, deadline=None)
@given(member=hostile, node=hostile, nack=hostile, replica=hostile)
def test_failovers_show_envoy_text_literally(member: str, node: str, nack: str,
                                             replica: str) -> None:
    record = {"cluster": "web", "member": member or "m", "cause": replica, "detected": 10.0,
              "built": 10.001, "ended": 10.002, "outcome": "converged", "replica": replica,
              "version": nack, "nodes_total": 1, "nacked": 1,
              "nodes": [{"node": node, "pushed": 10.001, "sent": 10.001,
                         "answered": 10.002, "nack": nack or "x"}]}
    read = read_of(RuntimeState(), failovers={("web", member or "m"): record})
    text = render(render_status, status_report(read))
    check(text, member or "m", replica)
    assert "recent failovers" in text and "0/1 acked, 1 NACK" in text
    assert shown(nack or "x")[:40] in text and shown(node)[:40] in text


def test_the_status_view_is_one_renderable_for_watch() -> None:
    state = RuntimeState(registrations={("web", "a"): Registration("127.0.0.1", 8001)})
    group = status_group(status_report(read_of(state)))
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(group)
    assert "cluster web" in out.getvalue() and "Envoy nodes" in out.getvalue()


@settings(max_examples=40, deadline=None)
@given(member=hostile, error=hostile, reasons=st.lists(hostile, max_size=3))
def test_sync_shows_sidecar_text_literally(member: str, error: str, reasons: list[str]) -> None:
    stats = {"ready": False, "reasons": reasons, "revision": error, "lag_seconds": error,
             "cached_sessions": 1, "errors": 2, "last_error": error,
             "last_full_sync": error, "published": 10.0, "publish_interval": error}
    read = read_of(RuntimeState(), sync={("web", member): stats},
                   registrations={("nosuch", member): {"site": error}})
    report = sync_report(read, now=1000.0)
    text = render(render_sync, report)
    check(text, member)
    assert "stale" in text and report["sidecars"][0]["stale"]


@settings(max_examples=40, deadline=None)
@given(name=hostile, error=hostile)
def test_sync_shows_each_shard_and_warns_of_one_unreachable(name: str, error: str) -> None:
    shards = {"version": 4, "shards": [
        {"name": "s1", "reachable": True, "revision": 9, "cached_sessions": 3},
        {"name": name, "reachable": False, "unreachable_for": 2.5, "last_error": error}]}
    stats = {"ready": True, "cached_sessions": 3, "published": 999.0, "shards": shards}
    report = sync_report(read_of(RuntimeState(), sync={("web", "m1"): stats}), now=1000.0)
    assert report["sidecars"][0]["shards"]["version"] == 4
    assert any(f"session shard {name} unreachable for 2.5 s" in w for w in report["warnings"])
    text = render(render_sync, report)
    assert "session shards" in text and "no (2.5 s)" in text
    check(text, name)
    junk = sync_report(read_of(RuntimeState(), sync={("web", "m1"): {
        **stats, "shards": {"shards": "x"}}}), now=1000.0)
    assert junk["sidecars"][0]["shards"] is None
    # A stored map the sidecar cannot use: it says so, and which version it serves.
    stuck = sync_report(read_of(RuntimeState(), sync={("web", "m1"): {
        **stats, "shards": {**shards, "map_error": error or "x"}}}), now=1000.0)
    assert any("(serving shard map version 4)" in w and (error or "x")[:300] in w
               for w in stuck["warnings"])


@settings(max_examples=40, deadline=None)
@given(node=hostile, nack=hostile, url=hostile, error=hostile)
def test_verify_shows_node_and_envoy_text_literally(node: str, nack: str, url: str,
                                                    error: str) -> None:
    state = RuntimeState()
    want = expected_versions(read_of(state))
    read = read_of(state, nodes={node: {
        "streams": 1, "replica": url,
        "types": {t: {"acked_version": v} for t, v in want.items()} | {
            ENDPOINT: {"acked_version": nack}},
        "last_nack": {"type_url": ENDPOINT, "version": None, "error": nack}}})
    live = live_from_model(read, node=node)
    live.url = url
    down = live_from_model(read, node=node)
    down.url, down.error = url, error
    text = render(render_verify, verify_report(read, [live, down]))
    check(text, node)
    assert "mismatch" in text


def test_markup_that_crashed_the_renderers_is_printed_as_typed() -> None:
    """The example found: a reason and a NACK text with closing tags."""
    state = RuntimeState(members_down={("api", "x"): AdminAction("[/red] see [b]", "ops", "T")})
    read = read_of(state, nodes={"e1": {"streams": 1, "types": {}, "last_nack": {
        "type_url": CLUSTER, "version": None, "error": "field [/bold] unknown"}}})
    text = render(render_status, status_report(read))
    assert "[/red] see [b]" in text and "field [/bold] unknown" in text
    text = render(render_verify, verify_report(MeshRead(1, MODEL, None, "e", state,
                                                        nodes=read.nodes)))
    assert "field [/bold] unknown" in text


def test_long_values_are_cut_and_control_characters_escaped() -> None:
    assert plain("x" * 5000).plain.startswith("x" * MAX_CELL + "... (4700 more")
    assert plain("a\x1b[2Jb\nc").plain == "a\\x1b[2Jb\\nc"
    assert plain("[red]é\u4e16").plain == "[red]é\u4e16"


@settings(max_examples=40, deadline=None)
@given(site=hostile, reason=hostile.filter(bool), detail=hostile, objective=hostile)
def test_drill_markdown_keeps_outside_text_literal(site: str, reason: str, detail: str,
                                                   objective: str) -> None:
    import re

    from meshxl.operator.drill import markdown

    def report(site: str, reason: str, detail: str, objective: str) -> dict[str, Any]:
        return {"site": site, "result": "aborted", "started": "T", "duration_s": 1.0,
                "refused": [reason], "abort_reason": reason,
                "steps": [{"step": "verify", "ok": False, "seconds": 1, "detail": detail}],
                "slo": {"failovers": 1, "met": False, "objectives": [
                    {"name": objective, "good": 1, "total": 2, "p50": 1, "p99": 2,
                     "met": False}]}}

    lines = markdown(report(site, reason, detail, objective)).splitlines()
    plain_lines = markdown(report("a", "b", "c", "d")).splitlines()
    assert len(lines) == len(plain_lines), lines  # no value adds a line
    assert lines[0].startswith("# DR drill: site ")
    for row in (line for line in lines if line.startswith("| ")):
        cells = re.split(r"(?<!\\)\|", row)  # unescaped pipes only
        assert len(cells) in (6, 7), row
    assert not any(re.search(r"(?<!\\)[\[\]<>`*_]", line) for line in lines[1:]
                   if not line.startswith(("|", "Result: ", "SLO review")))


def test_demo_summary_shows_failure_texts_literally(tmp_path: Any) -> None:
    from meshxl.local.report import print_summary

    report = {"mode": "[b]ha", "killed_member": "[/red]", "kill_at_s": 1.0, "requests": 10,
              "per_member_requests": {"a": 10}, "failed_requests": 1,
              "failures": {"ServerDisconnectedError: [/] closed": 1}, "lost_writes": 0,
              "acknowledged_writes": 9, "rto_ms": {}, "takeover_ms": {}, "files": {}}
    out = io.StringIO()
    print_summary(Console(file=out, width=300, color_system=None), report, tmp_path / "[x]")
    text = out.getvalue()
    assert "ServerDisconnectedError: [/] closed" in text and "member [/red]" in text
    assert "[x]/report.json" in text


def test_demo_summary_says_whose_figure_each_is(tmp_path: Any) -> None:
    """The clients' recovery (Envoy retried elsewhere at once) and the control plane's
    detection (the member's lease expiring) are different clocks: the summary names
    them, so a 2 s detection beside a 100 ms RTO reads as both true."""
    from meshxl.local.report import print_summary

    report = {"mode": "high-availability", "killed_member": "a", "kill_at_s": 8.0,
              "requests": 10, "per_member_requests": {"a": 4, "b": 6}, "failed_requests": 0,
              "lost_writes": 0, "acknowledged_writes": 10, "detection_ms": 2092.0,
              "convergence_ms": 13.0, "rto_ms": {"p50": 60, "p99": 100, "max": 100, "count": 3},
              "takeover_ms": {"p50": 18, "p99": 23, "count": 3}, "files": {}}
    out = io.StringIO()
    print_summary(Console(file=out, width=300, color_system=None), report, tmp_path)
    lines = out.getvalue().splitlines()
    rto = next(line for line in lines if "RTO" in line)
    detection = next(line for line in lines if "detection" in line)
    assert "clients" in rto and "100 ms" in rto, rto
    assert "control plane" in detection and "2092 ms" in detection, detection
    note = " ".join(lines)
    assert "retr" in note and "lease" in note, lines
