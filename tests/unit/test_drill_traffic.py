"""The drill's traffic report: requests per site and phase, and failed requests, from
Envoy's counters (pure: samples made up here, the sampling itself is tested against a
real Envoy in tests/integration/test_drill_counts.py)."""

from __future__ import annotations

from meshxl.operator.drill import _Sampler, _traffic, markdown


def sampler() -> _Sampler:
    s = _Sampler(["http://envoy:9901"], {}, 1.0)
    s.samples = [
        {"t": 1.0, "sites": {"dc1": 5, "dc2": 0}, "failed": 0, "answered": 5},
        {"t": 2.0, "sites": {"dc1": 0, "dc2": 5}, "failed": 2, "answered": 5},
        {"t": 3.0, "sites": {"dc1": 0, "dc2": 5}, "failed": 0, "answered": 5},
        {"t": 4.0, "sites": {"dc1": 5, "dc2": 0}, "failed": 1, "answered": 5},
    ]
    return s


def test_failed_requests_are_counted_over_the_whole_drill() -> None:
    t = _traffic(sampler(), "dc1", {"offline": 1.0, "offline converged": 1.0,
                                    "online": 3.5})
    assert t["failed_requests"] == 3 and t["answered_requests"] == 20
    assert t["moved"] is True
    report = {"site": "dc1", "started": "t0", "duration_s": 2.0, "result": "failed",
              "steps": [], "traffic": t}
    assert "Failed requests (answered 5xx by Envoy's listeners): 3 of 20" in markdown(report)


def test_samples_without_answer_counts_count_nothing() -> None:
    s = _Sampler(["http://envoy:9901"], {}, 1.0)
    s.samples = [{"t": 1.0, "sites": {"dc1": 1}}]
    assert _traffic(s, "dc1", {})["failed_requests"] == 0


def test_a_clusters_websockets_count_with_its_requests() -> None:
    """WebSockets go through the cluster's upgrades twin: their requests are the model
    cluster's, per member address, so a site's traffic includes them."""
    from meshxl.operator.drill import host_counters
    from meshxl.proxy.admin import Host

    def host(port: int, rq: int) -> Host:
        return Host(address="127.0.0.1", port=port, stats={"rq_total": rq})

    counts = host_counters({"web": [host(1, 5), host(2, 1)], "web~ws": [host(1, 3)],
                            "api": [host(3, 7)]})
    assert counts == {"web/127.0.0.1:1": 8, "web/127.0.0.1:2": 1, "api/127.0.0.1:3": 7}


def test_a_sample_that_spans_the_move_is_not_counted_as_during() -> None:
    """A dual-site run of the suite: the counters took 0.6 s to read, so the first
    sample stamped a sample interval after convergence held requests sent before it, and
    the drill failed with "Traffic left the site: False". Its counters were first read
    before the move: it belongs to no phase's verdict."""
    s = _Sampler(["http://envoy:9901"], {}, 0.5)
    s.samples = [
        {"t": 0.5, "since": 0.0, "sites": {"east": 9, "west": 9}},
        {"t": 1.6, "since": 0.4, "sites": {"east": 2, "west": 20}},  # read 0.4 .. 1.6
        {"t": 2.4, "since": 1.0, "sites": {"east": 0, "west": 25}},
        {"t": 3.4, "since": 1.9, "sites": {"east": 0, "west": 25}},
        {"t": 4.4, "since": 2.9, "sites": {"east": 0, "west": 25}},
    ]
    t = _traffic(s, "east", {"offline": 0.45, "offline converged": 0.85, "online": 4.0})
    assert t["during"] == {"east": 0, "west": 25} and t["moved"] is True
    # A request sent to the drilled site after the move still fails the drill.
    s.samples[3]["sites"]["east"] = 1
    assert _traffic(s, "east", {"offline": 0.45, "offline converged": 0.85,
                                "online": 4.0})["moved"] is False
