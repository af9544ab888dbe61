"""meshxl.xds.accesslog: Envoy's access log entries to upstream samples, and the bounds."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.data.accesslog.v3.accesslog_pb2 import (
    AccessLogType,
    HTTPAccessLogEntry,
    TCPAccessLogEntry,
)
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage

from meshxl.xds import accesslog
from meshxl.xds.accesslog import AccessLogReceiver, http_sample, istio_cluster, tcp_sample
from meshxl.xds.metrics import XdsMetrics
from meshxl.xds.server import peer_host
from meshxl.xds.upstream import HostSample, UpstreamSignals

T0 = 1_700_000_000.0


def http(code: int = 200, *, cluster: str = "web", address: str = "10.0.0.1", port: int = 80,
         rx: float | None = 0.012, flags: tuple[str, ...] = (), trailers: dict[str, str] | None
         = None, headers: dict[str, str] | None = None,
         kind: Any = AccessLogType.DownstreamEnd) -> HTTPAccessLogEntry:
    e = HTTPAccessLogEntry()
    c = e.common_properties
    c.upstream_cluster = cluster
    if address:
        c.upstream_remote_address.socket_address.address = address
        c.upstream_remote_address.socket_address.port_value = port
    if rx is not None:
        c.time_to_first_upstream_rx_byte.FromNanoseconds(round(rx * 1e9))
    for flag in flags:
        setattr(c.response_flags, flag, True)
    c.access_log_type = kind
    if code:
        e.response.response_code.value = code
    e.response.response_trailers.update(trailers or {})
    e.response.response_headers.update(headers or {})
    return e


def test_a_connection_never_made_says_nothing_of_the_member() -> None:
    """Refused or unreachable: down or cut off for this Envoy, not sick."""
    assert http_sample(http(503, flags=("upstream_connection_failure",), rx=None)) is None


def test_a_timeout_without_an_answer_counts_the_time_it_waited() -> None:
    """Connected and never answered (a hanging member): a failure as slow as the wait,
    so the member is judged sick, not passed over as down."""
    # As Envoy 1.40's router logs an attempt its route timeout ended: sent, no response
    # code, no flag, its duration.
    hung = http(0, rx=None, kind=AccessLogType.UpstreamEnd)
    hung.common_properties.time_to_first_upstream_tx_byte.FromNanoseconds(15_000)
    hung.common_properties.duration.FromNanoseconds(500_000_000)
    assert http_sample(hung) == ("web", "10.0.0.1:80", pytest.approx(0.5), False)
    timed_out = http(504, flags=("upstream_request_timeout",), rx=None)
    timed_out.common_properties.time_to_first_upstream_tx_byte.FromNanoseconds(15_000)
    timed_out.common_properties.duration.FromNanoseconds(500_000_000)
    assert http_sample(timed_out) == ("web", "10.0.0.1:80", pytest.approx(0.5), True)
    # Without a duration (an older Envoy), or never sent: no latency, as before.
    hung.common_properties.ClearField("duration")
    assert http_sample(hung) == ("web", "10.0.0.1:80", None, False)
    unsent = http(0, rx=None, kind=AccessLogType.UpstreamEnd)
    unsent.common_properties.duration.FromNanoseconds(500_000_000)
    assert http_sample(unsent) == ("web", "10.0.0.1:80", None, False)
    # The member reset it (killed): its duration is no latency.
    reset = http(0, flags=("upstream_remote_reset",), rx=None)
    reset.common_properties.time_to_first_upstream_tx_byte.FromNanoseconds(15_000)
    reset.common_properties.duration.FromNanoseconds(500_000_000)
    assert http_sample(reset) == ("web", "10.0.0.1:80", None, True)


def test_a_plain_answer_is_its_host_and_its_time_to_first_byte() -> None:
    assert http_sample(http()) == ("web", "10.0.0.1:80", pytest.approx(0.012), False)
    assert http_sample(http(address="::1", port=8080))[1] == "[::1]:8080"  # type: ignore[index]
    assert http_sample(http(rx=None)) == ("web", "10.0.0.1:80", None, False)
    assert http_sample(http(kind=AccessLogType.NotSet)) is not None
    # The router's upstream log: one entry per attempt, a WebSocket's at its close.
    assert http_sample(http(kind=AccessLogType.UpstreamEnd)) is not None
    assert http_sample(http(101, rx=0.003, kind=AccessLogType.UpstreamEnd)) == (
        "web", "10.0.0.1:80", pytest.approx(0.003), False)


@pytest.mark.parametrize("entry", [
    http(500), http(503), http(599),
    http(0, flags=("upstream_remote_reset",)),
    http(504, flags=("upstream_request_timeout",)),
    http(0, flags=("upstream_connection_termination",)),
    http(503, flags=("upstream_overflow",)),
    http(200, trailers={"grpc-status": "14"}),  # UNAVAILABLE
    http(200, trailers={"grpc-status": "2"}),
    http(200, trailers={"grpc-status": "4"}),
    http(200, trailers={"grpc-status": "13"}),
    http(200, trailers={"grpc-status": "15"}),
    http(200, headers={"grpc-status": "13"}),  # a trailers-only answer
])
def test_failures(entry: HTTPAccessLogEntry) -> None:
    sample = http_sample(entry)
    assert sample is not None and sample[3] is True


@pytest.mark.parametrize("entry", [
    http(404), http(499), http(302),
    http(200, trailers={"grpc-status": "0"}),
    http(200, trailers={"grpc-status": "5"}),  # NOT_FOUND: the caller's, not the member's
    http(200, headers={"grpc-status": "16"}),
    http(200, flags=("downstream_connection_termination",)),
])
def test_not_failures(entry: HTTPAccessLogEntry) -> None:
    sample = http_sample(entry)
    assert sample is not None and sample[3] is False


def test_entries_without_an_upstream_host_are_skipped() -> None:
    assert http_sample(http(503, address="", flags=("no_healthy_upstream",))) is None
    assert http_sample(http(404, cluster="", address="")) is None
    assert http_sample(http(kind=AccessLogType.DownstreamPeriodic)) is None
    assert http_sample(http(kind=AccessLogType.UpstreamPoolReady)) is None
    assert http_sample(http(kind=AccessLogType.UpstreamPeriodic)) is None


def test_a_connection_managers_websocket_counts_once_with_its_time_to_101() -> None:
    opened = http(101, rx=0.004, kind=AccessLogType.DownstreamTunnelSuccessfullyEstablished)
    assert http_sample(opened) == ("web", "10.0.0.1:80", pytest.approx(0.004), False)
    assert http_sample(http(101, kind=AccessLogType.DownstreamEnd)) is None


def test_a_websockets_entry_counts_for_its_model_cluster() -> None:
    """WebSockets go to the cluster's upgrades twin: their entries count for the model
    cluster, with its plain requests, so its members are judged on both."""
    ended = http(101, rx=0.004, cluster="web~ws", kind=AccessLogType.UpstreamEnd)
    assert http_sample(ended) == ("web", "10.0.0.1:80", pytest.approx(0.004), False)
    assert http_sample(http(502, cluster="web~ws"))[:2] == ("web", "10.0.0.1:80")


def tcp(kind: Any, *, failed: bool = False, address: str = "10.0.0.2") -> TCPAccessLogEntry:
    e = TCPAccessLogEntry()
    c = e.common_properties
    c.upstream_cluster = "db"
    if address:
        c.upstream_remote_address.socket_address.address = address
        c.upstream_remote_address.socket_address.port_value = 5432
    c.access_log_type = kind
    c.response_flags.upstream_connection_failure = failed
    return e


def test_a_tcp_connection_counts_once() -> None:
    assert tcp_sample(tcp(AccessLogType.TcpUpstreamConnected)) == ("db", "10.0.0.2:5432", None,
                                                                  False)
    assert tcp_sample(tcp(AccessLogType.TcpConnectionEnd)) is None  # counted when connected
    assert tcp_sample(tcp(AccessLogType.TcpPeriodic)) is None
    assert tcp_sample(tcp(AccessLogType.TcpConnectionEnd, failed=True)) == (
        "db", "10.0.0.2:5432", None, True)
    assert tcp_sample(tcp(AccessLogType.TcpConnectionEnd, address="")) is None


def message(*entries: HTTPAccessLogEntry, tcp_entries: tuple[TCPAccessLogEntry, ...] = ()
            ) -> StreamAccessLogsMessage:
    """A message holds HTTP entries or TCP entries (a oneof), never both."""
    m = StreamAccessLogsMessage()
    if tcp_entries:
        m.tcp_logs.log_entry.extend(tcp_entries)
    else:
        m.http_logs.log_entry.extend(entries)
    return m


def test_receiver_records_counts_and_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    signals = UpstreamSignals()
    metrics = XdsMetrics()
    receiver = AccessLogReceiver(signals, metrics=metrics, clock=lambda: T0 + 0.1)
    stream = accesslog._Stream(0.0)  # noqa: SLF001
    receiver.receive(stream, message(http(), http(503), http(address=""),
                                     http(cluster="x" * 300)))
    receiver.receive(stream, message(tcp_entries=(tcp(AccessLogType.TcpUpstreamConnected),)))
    assert receiver.counts == {"recorded": 3, "dropped": 1, "unrouted": 0, "refused": 0}
    assert signals.summary("web", T0, T0 + 0.5)["10.0.0.1:80"].errors == 1
    assert signals.summary("db", T0, T0 + 0.5) == {"10.0.0.2:5432": HostSample(1, 0, None, None,
                                                                             None)}
    # Past the entries of one message, and past a stream's budget, entries are dropped.
    monkeypatch.setattr(accesslog, "MAX_ENTRIES_PER_MESSAGE", 10)
    receiver.receive(stream, message(*[http() for _ in range(25)]))
    assert receiver.counts["recorded"] == 13 and receiver.counts["dropped"] == 16
    monkeypatch.setattr(accesslog, "ENTRIES_PER_SECOND", 4)
    starved = accesslog._Stream(0.0)  # noqa: SLF001
    receiver.receive(starved, message(*[http() for _ in range(10)]))  # a burst of 8
    assert receiver.counts["recorded"] == 21 and receiver.counts["dropped"] == 18
    value = metrics.registry.get_sample_value("meshxl_xds_access_log_entries_total",
                                              {"result": "dropped"})
    assert value == 18


def test_peer_host() -> None:
    assert peer_host("ipv4:10.0.0.1:5000") == "10.0.0.1"
    assert peer_host("ipv6:[::1]:5000") == "::1"
    assert peer_host("unix:/tmp/x") == "unix:/tmp/x"


ISTIO_MODEL = """
clusters:
- name: web
  mode: load-sharing
  stickiness: {header: x-session}
  listener: {port: 8080}
  members:
  - {name: a, address: 10.1.0.1, port: 9000}
  - {name: b, address: 10.1.0.2, port: 9000}
  - {name: c, address: 10.1.0.3, port: 9000}
"""


def test_istio_cluster_names_map_to_the_model_cluster_of_their_service() -> None:
    known = {"web", "db"}
    assert istio_cluster("outbound|8080||web.shop.svc.cluster.local", known) == "web"
    assert istio_cluster("outbound|5432|v1|db.other.svc.example.org", known) == "db"
    for name in ("outbound|8080||api.shop.svc.cluster.local",  # no such model cluster
                 "inbound|8080||web.shop.svc.cluster.local",
                 "outbound|x||web.shop.svc.cluster.local",
                 "outbound|8080||web.example.com",  # not a Kubernetes Service's host
                 "outbound|8080|web.shop.svc.cluster.local", "web", ""):
        assert istio_cluster(name, known) is None, name


def test_istio_shaped_entries_are_judged_as_the_model_cluster() -> None:
    """Entries as Istio's sidecars send them (a connection manager's log, the cluster
    named as ``meshxl istio render``'s EnvoyFilter matches it) are recorded against
    the model's cluster, so its slow member is judged."""
    from meshxl.istio.render import IstioOptions, render_model
    from meshxl.model import RuntimeState, parse_model
    from meshxl.xds.health import Judge

    model = parse_model(ISTIO_MODEL)
    rendered = render_model(model, IstioOptions(namespace="shop"))
    [match] = [p["match"]["cluster"] for o in rendered.objects if o["kind"] == "EnvoyFilter"
               for p in o["spec"]["configPatches"] if p["applyTo"] == "CLUSTER"]
    istio_name = f"outbound|{match['portNumber']}||{match['service']}"
    assert istio_name == "outbound|8080||web.shop.svc.cluster.local"

    now = T0 + 10.0
    signals = UpstreamSignals()
    clock = [0.0]
    receiver = AccessLogReceiver(signals, clock=lambda: clock[0], model=lambda: model)
    stream = accesslog._Stream(0.0)  # noqa: SLF001
    for k in range(16):  # 8 s of 0.5 s windows, 20 requests per member each
        clock[0] = now - 8.0 + k * 0.5 + 0.1
        slow = clock[0] >= now - 3.0
        entries = [http(cluster=istio_name, address=f"10.1.0.{i}", port=9000,
                        rx=0.2 if (slow and i == 3) else 0.01)
                   for i in (1, 2, 3) for _ in range(20)]
        stream.tokens = 1e9
        receiver.receive(stream, message(*entries))
    assert signals.clusters() == ["web"]
    found = Judge("r1").judge(model, RuntimeState(), signals, now)
    assert list(found.records) == [("web", "c")], found
    # Without the model, the names are recorded as they come (and nothing is judged).
    raw = UpstreamSignals()
    AccessLogReceiver(raw, clock=lambda: now).receive(accesslog._Stream(0.0),  # noqa: SLF001
                                                      message(http(cluster=istio_name)))
    assert raw.clusters() == [istio_name]
