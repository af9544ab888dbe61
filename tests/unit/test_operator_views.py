"""The operator views without processes: state transitions and their reasons, the
status / sync / verify reports, convergence timing, and the table renderers."""

from __future__ import annotations

import io
import time
from textwrap import dedent
from typing import Any

from rich.console import Console

from meshxl.model import AdminAction, Registration, RuntimeState, parse_model
from meshxl.model.records import DEGRADED_KIND, PROBE_KIND, Health
from meshxl.operator.tables import render_status, render_sync, render_verify
from meshxl.operator.views import (
    DEPARTED_SECONDS,
    EnvoyLive,
    MeshRead,
    expected_endpoints,
    expected_versions,
    failover_report,
    live_report,
    status_report,
    sync_report,
    verify_report,
)
from meshxl.xds.cache import Snapshot
from meshxl.xds.compiler import Compiler
from meshxl.xds.failover import losses
from meshxl.xds.history import transitions
from meshxl.xds.metrics import Convergence, XdsMetrics
from meshxl.xds.stepdown import released, shares
from meshxl.xds.types import CLUSTER, ENDPOINT

MODEL = parse_model(dedent("""
    clusters:
      - name: web
        mode: high-availability
        membership: registered
        stickiness: {header: x-session-id}
        sites: [{name: dc1}, {name: dc2}]
        listener: {address: 127.0.0.1, port: 10000}
      - name: api
        mode: load-sharing
        stickiness: {cookie: {name: sid}, algorithm: ring_hash}
        listener: {address: 127.0.0.1, port: 10001}
        members:
          - {name: x, address: 127.0.0.1, port: 9001, weight: 300}
          - {name: y, address: 127.0.0.1, port: 9002, weight: 100}
    """))


def reg(port: int, site: str, **kw: Any) -> Registration:
    return Registration(address="127.0.0.1", port=port, site=site, **kw)


def runtime(**extra: Any) -> RuntimeState:
    regs = {("web", "a"): reg(8001, "dc1"), ("web", "b"): reg(8002, "dc1"),
            ("web", "c"): reg(8003, "dc2")}
    regs.update(extra.pop("registrations", {}))
    for key in extra.pop("gone", ()):
        regs.pop(key)
    return RuntimeState(registrations=regs, **extra)


def read_of(state: RuntimeState, **fields: Any) -> MeshRead:
    return MeshRead(revision=42, model=MODEL, model_error=None, model_source="etcd",
                    runtime=state, **fields)


# -- transitions ---------------------------------------------------------------------------


def test_transitions_name_every_change_with_a_reason() -> None:
    before = runtime()
    down = runtime(members_down={("web", "a"): AdminAction("patching", "ops@host", "t")})
    [change] = transitions(MODEL, before, down)
    assert (change.cluster, change.member, change.from_state, change.to_state) == (
        "web", "a", "ready", "admin-down")
    assert change.reason == "member down by ops@host: patching" and change.failover

    lost = transitions(MODEL, before, runtime(gone=[("web", "b")]))
    assert [(c.member, c.to_state, c.failover) for c in lost] == [("b", "lost", True)]
    assert "lease ended" in lost[0].reason

    problem = runtime(registrations={("web", "c"): reg(8003, "dc2", problems=("disk",))})
    [p] = transitions(MODEL, before, problem)
    assert (p.to_state, p.reason) == ("problem", "problem reported: disk")
    # A second problem while already in trouble is a change too (not a failover).
    worse = runtime(registrations={("web", "c"): reg(8003, "dc2", problems=("db", "disk"))})
    [w] = transitions(MODEL, problem, worse)
    assert w.from_state == w.to_state == "problem" and not w.failover

    # Coming back is a change but not a failover; nothing changed is no change.
    [back] = transitions(MODEL, down, before)
    assert (back.to_state, back.reason, back.failover) == ("ready", "ready", False)
    assert transitions(MODEL, before, runtime()) == []


def test_site_offline_changes_every_member_of_the_site() -> None:
    offline = runtime(sites_offline={"dc1": AdminAction("drill", "ops", "t")})
    changes = transitions(MODEL, runtime(), offline)
    assert {(c.member, c.to_state) for c in changes} == {("a", "site-offline"),
                                                         ("b", "site-offline")}
    assert all(c.reason == "site dc1 offline by ops: drill" for c in changes)
    assert [(x.member, x.cause) for x in losses(MODEL, runtime(), offline)] == [
        ("a", "site_offline"), ("b", "site_offline")]


# -- status --------------------------------------------------------------------------------


def test_status_report_roles_shares_states_and_history() -> None:
    state = runtime(members_down={("web", "a"): AdminAction("patching", "ops@h", "T1")})
    read = read_of(state, states={("web", "a"): {
        "state": "admin-down", "reason": "member down by ops@h: patching", "at": "T1",
        "failovers": 3, "last_failover": {"at": "T1"}}},
        nodes={"envoy-1": {"cluster": "edge", "replica": "xds-0", "streams": 1,
                           "types": {CLUSTER: {"acked_version": "v1"}},
                           "nacks": 1, "last_nack": {"type_url": CLUSTER, "version": "v2",
                                                     "error": "bad", "time": 1.0}}})
    report = status_report(read)
    web = next(c for c in report["clusters"] if c["name"] == "web")
    assert web["stickiness"] == {"algorithm": "maglev", "key": "header", "on": "x-session-id"}
    members = {m["name"]: m for m in web["members"]}
    a, b, c = members["a"], members["b"], members["c"]
    assert a["state"] == "admin-down" and a["admin"]["reason"] == "patching"
    assert a["failovers"] == 3 and a["last_change"]["at"] == "T1"
    assert a["role"] == "none" and a["share"] == 0 and a["priority"] == 0  # drained, sent
    assert (b["role"], b["share"]) == ("active", 1.0)
    assert (c["role"], c["share"], c["site"]) == ("standby", 0, "dc2")
    # No history record: the current state with its reason.
    assert b["last_change"]["state"] == "ready" and b["failovers"] == 0

    api = next(c for c in report["clusters"] if c["name"] == "api")
    shares = {m["name"]: m["share"] for m in api["members"]}
    assert shares == {"x": 0.75, "y": 0.25}
    assert {m["role"] for m in api["members"]} == {"load-sharing"}

    [node] = report["nodes"]
    assert node["acked"] == {"CDS": "v1"} and node["replica"] == "xds-0"
    assert node["last_nack"]["type"] == "CDS" and node["last_nack"]["error"] == "bad"
    assert status_report(read, "api")["clusters"][0]["name"] == "api"

    out = io.StringIO()
    render_status(report, Console(file=out, width=200))
    text = out.getvalue()
    assert "cluster web" in text and "admin-down" in text and "CDS v2: bad" in text


def test_a_member_whose_registration_ended_is_listed_as_lost_for_a_while() -> None:
    at = "2026-01-01T00:00:00.000+00:00"
    then = 1767225600.0  # at, as epoch seconds
    history = {"state": "lost", "reason": "registration lease ended", "at": at,
               "failovers": 2}
    read = read_of(runtime(gone=[("web", "a")]), states={
        ("web", "a"): history, ("web", "b"): {**history, "state": "ready"},
        ("api", "old"): history})
    report = status_report(read, now=then + 10)
    web = next(c for c in report["clusters"] if c["name"] == "web")
    assert [m["name"] for m in web["members"]] == ["b", "c"]
    [gone] = web["departed"]
    assert (gone["name"], gone["state"], gone["failovers"]) == ("a", "lost", 2)
    assert gone["last_change"]["reason"] == "registration lease ended"
    # A listed member stays in "members"; and after a while the departed are forgotten.
    api = next(c for c in report["clusters"] if c["name"] == "api")
    assert [m["name"] for m in api["departed"]] == ["old"]
    later = status_report(read, now=then + DEPARTED_SECONDS + 1)
    assert all(not c["departed"] for c in later["clusters"])
    text = io.StringIO()
    render_status(report, Console(file=text, width=200))
    assert "lost (left)" in text.getvalue()


def _failover_record(**extra: Any) -> dict[str, Any]:
    return {"id": "web/a@1", "traceparent": None, "cluster": "web", "member": "a",
            "cause": "lease_expired", "from_state": "ready", "to_state": "lost",
            "detected": 100.0, "rebuild": 100.001, "built": 100.002, "version": "v2",
            "nodes_total": 2, "acked": 1, "nacked": 1, "outcome": "converged",
            "ended": 100.0105, "replica": "xds-0",
            "nodes": [{"node": "e1", "pushed": 100.002, "sent": 100.003,
                       "answered": 100.004, "nack": None},
                      {"node": "e2", "pushed": 100.002, "sent": 100.003,
                       "answered": 100.01, "nack": "bad endpoint"}], **extra}


def test_failovers_join_the_takeovers_their_new_owners_published() -> None:
    takeovers = [{"failover": "web/a@1", "member": "a", "count": 12, "first": 98.0,
                  "last": 98.5, "times": [[98.0, 98.1], [98.2, 98.5]]},
                 {"failover": "web/a@0", "member": "a", "count": 99, "first": 1.0,
                  "last": 2.0, "times": []}]  # an older failover of the same member
    read = read_of(runtime(gone=[("web", "a")]), failovers={
        ("web", "a"): _failover_record(),
        ("web", "c"): _failover_record(member="c", id="web/c@1", detected=200.0,
                                       outcome="open", ended=None, nodes=[])},
        sync={("web", "b"): {"failover_takeovers": takeovers},
              ("api", "x"): {"failover_takeovers": [{**takeovers[0], "count": 5}]}})
    report = failover_report(read)
    assert [(f["member"], f["outcome"]) for f in report] == [("c", "open"), ("a", "converged")]
    a = report[1]
    assert a["converged_ms"] == 10.5 and (a["acked"], a["nacked"]) == (1, 1)
    assert [n["nack"] for n in a["nodes"]] == [None, "bad endpoint"]
    assert a["takeovers"] == [{"member": "b", "count": 12, "first": 98.0, "last": 98.5,
                               "times": [[98.0, 98.1], [98.2, 98.5]]}]
    assert a["takeover_count"] == 12
    assert report[0]["converged_ms"] is None and report[0]["takeovers"] == []
    assert failover_report(read, "api") == []
    assert status_report(read)["failovers"] == report
    assert live_report(read, now=300.0)["status"]["failovers"] == report


def test_malformed_failover_records_are_shown_as_far_as_they_go() -> None:
    junk: dict[str, Any] = {"detected": "yesterday", "nodes": [1, {"node": 5}, {"node": "e"}],
                            "acked": -3, "nacked": True, "outcome": ["x"], "ended": float("nan"),
                            "cause": {"x": 1}}
    read = read_of(runtime(), failovers={("web", "a"): junk},
                   sync={("web", "b"): {"failover_takeovers": "lots"},
                         ("web", "c"): {"failover_takeovers": [None, {"failover": None}]}})
    [f] = failover_report(read)
    assert f["detected"] is None and f["ended"] is None and f["cause"] is None
    assert [n["node"] for n in f["nodes"]] == ["e"]
    assert (f["acked"], f["nacked"], f["outcome"]) == (0, 0, "open")
    assert f["takeovers"] == [] and f["converged_ms"] is None
    render_status(status_report(read), Console(file=io.StringIO(), width=200))


# -- sync ----------------------------------------------------------------------------------


def test_sync_report_lists_sidecars_and_the_silent_ones() -> None:
    stats = {"ready": True, "revision": 7, "lag_seconds": 0.002, "cached_sessions": 10,
             "owned_sessions": 4, "takeovers": 2, "write_conflicts": 1, "errors": 0,
             "last_full_sync": 100.0, "published": 990.0}
    read = read_of(runtime(), sync={("web", "a"): stats},
                   registrations={("web", "a"): {}, ("web", "b"): {}})
    report = sync_report(read, now=1000.0)
    [row] = report["sidecars"]
    assert (row["member"], row["owned_sessions"], row["age_seconds"]) == ("a", 4, 10.0)
    assert report["without_statistics"] == [{"cluster": "web", "member": "b"}]
    # In the model, not registered: its sidecar is down or still waiting for etcd.
    assert {"cluster": "web", "member": "c"} in report["unregistered"]
    assert sync_report(read, cluster="api")["sidecars"] == []
    out = io.StringIO()
    render_sync(report, Console(file=out, width=200))
    assert "web" in out.getvalue() and "no statistics" in out.getvalue()
    assert "web/c: not registered" in out.getvalue()


def test_sync_view_shows_undecodable_sessions() -> None:
    stats = {"ready": True, "revision": 7, "undecodable_sessions": 3, "published": 990.0}
    read = read_of(runtime(), sync={("web", "a"): stats}, registrations={("web", "a"): {}})
    report = sync_report(read, now=1000.0)
    assert report["sidecars"][0]["undecodable_sessions"] == 3
    out = io.StringIO()
    render_sync(report, Console(file=out, width=250))
    assert "undecodable" in out.getvalue() and " 3 " in out.getvalue()


# -- verify --------------------------------------------------------------------------------


def test_expected_versions_are_what_the_control_plane_serves() -> None:
    state = runtime()
    served = Snapshot.build(Compiler().compile(MODEL, state).by_type()).versions
    assert expected_versions(read_of(state)) == served


def test_verify_expects_the_weights_the_judgements_give() -> None:
    """A probed standby and a degraded load-sharing member (judgements in etcd) get a
    share of their weight from the control plane: verify expects those weights, not
    the model's, so a mesh that is exactly as the control plane made it verifies."""
    now = time.time()
    state = runtime(health={
        ("web", "b"): Health(kind=PROBE_KIND, since=now - 1, by="xds-0", behind="a"),
        ("api", "x"): Health(kind=DEGRADED_KIND, since=now - 1, by="xds-0")})
    judged, _ = shares(MODEL, state, now)
    assert judged["web"]["b"] < 1 and judged["api"]["x"] < 1
    served = Compiler().compile(MODEL, state, warming=judged,
                                released=released(MODEL, state, now))
    assert expected_versions(read_of(state)) == Snapshot.build(served.by_type()).versions
    assert expected_versions(read_of(state)) != expected_versions(read_of(runtime()))
    weights = {name: {h["member"]: h["weight"] for h in hosts}
               for name, hosts in expected_endpoints(read_of(state)).items()}
    plain = {name: {h["member"]: h["weight"] for h in hosts}
             for name, hosts in expected_endpoints(read_of(runtime())).items()}
    assert weights["api"]["x"] == round(plain["api"]["x"] * judged["api"]["x"])
    assert weights["web"]["b"] < plain["web"]["b"]
    read = read_of(state, nodes={"e1": acked_node(expected_versions(read_of(state)))})
    assert verify_report(read, [live_from_model(read)])["ok"]


def acked_node(versions: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {"streams": 1, "replica": "xds-0",
            "types": {t: {"acked_version": v} for t, v in versions.items()}, **extra}


def test_verify_passes_when_every_node_acked_the_model_and_names_each_mismatch() -> None:
    state = runtime()
    want = expected_versions(read_of(state))
    good = verify_report(read_of(state, nodes={"e1": acked_node(want)}))
    assert good["ok"] and good["mismatches"] == []

    stale = dict(want, **{ENDPOINT: "0000"})
    bad = verify_report(read_of(state, nodes={"e1": acked_node(want),
                                              "e2": acked_node(stale)}))
    assert not bad["ok"]
    [m] = bad["mismatches"]
    assert m["node"] == "e2" and m["kind"] == "version" and m["type"] == "EDS"
    assert "EDS acked 0000" in m["message"]

    nacked = acked_node(want, last_nack={"type_url": CLUSTER, "version": want[CLUSTER],
                                         "error": "no"})
    [n] = verify_report(read_of(state, nodes={"e1": nacked}))["mismatches"]
    assert n["kind"] == "nack" and "no" in n["message"]

    assert not verify_report(MeshRead(1, None, "bad", "etcd", RuntimeState()))["ok"]


def live_from_model(read: MeshRead, node: str = "e1") -> EnvoyLive:
    clusters = {name: [{k: h[k] for k in ("address", "priority", "weight", "draining")}
                       for h in hosts] for name, hosts in expected_endpoints(read).items()}
    return EnvoyLive(url="http://127.0.0.1:9901", node_id=node, clusters=clusters)


def test_verify_compares_live_envoy_endpoints() -> None:
    state = runtime()
    read = read_of(state, nodes={"e1": acked_node(expected_versions(read_of(state)))})
    live = live_from_model(read)
    assert verify_report(read, [live])["ok"]

    # The model moved on (a drained), this Envoy did not.
    drained = runtime(members_down={("web", "a"): AdminAction()})
    read2 = read_of(drained, nodes=read.nodes)
    report = verify_report(read2, [live])
    messages = [m["message"] for m in report["mismatches"]]
    assert any("a (127.0.0.1:8001) draining is False" in t for t in messages), messages
    assert any(m["kind"] == "version" for m in report["mismatches"])

    # An Envoy connected to no replica, one missing a cluster, one unreachable.
    orphan = live_from_model(read, node="e9")
    del orphan.clusters["api"]
    report = verify_report(read, [orphan, EnvoyLive(url="http://127.0.0.1:1", error="down")])
    kinds = sorted(m["kind"] for m in report["mismatches"])
    assert kinds == ["cluster", "disconnected", "envoy"], report["mismatches"]
    out = io.StringIO()
    render_verify(report, Console(file=out, width=200))
    assert "mismatch" in out.getvalue()

    # Envoy itself says it lost its control plane (the status in etcd lags a lease TTL).
    cut_off = live_from_model(read)
    cut_off.connected = False
    [m] = verify_report(read, [cut_off])["mismatches"]
    assert m["kind"] == "disconnected" and "connected_state 0" in m["message"]


def test_verify_checks_the_clusters_that_carry_websockets_too() -> None:
    """A cluster's upgrades twin reads its EDS resource: an Envoy whose twin lacks a
    member, or the twin itself, sends that cluster's WebSockets elsewhere."""
    state = runtime()
    read = read_of(state, nodes={"e1": acked_node(expected_versions(read_of(state)))})
    wanted = expected_endpoints(read)
    assert wanted["web~ws"] == wanted["web"] and wanted["api~ws"] == wanted["api"]
    live = live_from_model(read)
    live.clusters["web~ws"] = live.clusters["web~ws"][1:]
    del live.clusters["api~ws"]
    problems = verify_report(read, [live])["mismatches"]
    assert sorted((m["kind"], m["cluster"]) for m in problems) == [
        ("cluster", "api~ws"), ("endpoint", "web~ws")], problems
    # Both lacking the same member (an Envoy whose control plane stopped): said once,
    # of the cluster itself.
    both = live_from_model(read)
    both.clusters["web"] = both.clusters["web"][1:]
    both.clusters["web~ws"] = both.clusters["web~ws"][1:]
    problems = verify_report(read, [both])["mismatches"]
    assert [(m["kind"], m["cluster"]) for m in problems] == [("endpoint", "web")], problems


# -- convergence ---------------------------------------------------------------------------


def test_convergence_waits_for_every_connected_node() -> None:
    metrics = XdsMetrics()
    conv = Convergence(metrics)
    versions = {CLUSTER: "c2", ENDPOINT: "e2"}
    # Connected nodes and what they ACKed (AdsServer.acked: disconnected ones are out).
    conv.published(versions, 0, {"n1": {CLUSTER: "c1", ENDPOINT: "e1"},
                                 "n2": {ENDPOINT: "e1"}})
    assert conv.waiting == {"n1", "n2"}
    conv.node_changed("n2", acked_node({ENDPOINT: "e2"}))  # EDS only: done
    conv.node_changed("n1", acked_node({CLUSTER: "c2", ENDPOINT: "e1"}))  # not yet
    assert conv.waiting == {"n1"}
    count = metrics.registry.get_sample_value("meshxl_xds_convergence_seconds_count")
    assert count == 0
    conv.node_changed("n1", acked_node(versions))
    assert metrics.registry.get_sample_value("meshxl_xds_convergence_seconds_count") == 1
    # No connected Envoy: nothing to time.
    conv.published(versions, 0, {})
    assert metrics.registry.get_sample_value("meshxl_xds_convergence_seconds_count") == 1
