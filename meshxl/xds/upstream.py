"""Per upstream host request counts, errors and latency percentiles, in fixed windows.

The signal a sick member is judged on (docs/faults.md): every request an Envoy sent to
a member, as that Envoy saw it, arrives through the access log service
(:mod:`meshxl.xds.accesslog`) and is recorded here against its cluster and host
(``"ip:port"``, as Envoy names the upstream). Pure: no gRPC, no I/O; the clock is an
argument, so the same code is tested with made-up times.

**Windows.** Samples fall into fixed windows of :data:`WINDOW` seconds on the Unix
clock (window ``k`` is ``[k * WINDOW, (k + 1) * WINDOW)``); :data:`KEEP` windows are
kept per host (the older dropped as newer ones open), and at most ``max_hosts`` hosts
over all clusters (the one that recorded least recently forgotten first), so memory is
bounded however many requests or host names arrive.

**Percentiles** come from a fixed log-bucketed histogram per window, never from stored
samples (:func:`meshxl.stats.quantile`, the reports' one definition, needs every sample,
and a busy host sends thousands a second: stored samples would grow with the traffic,
143 counts do not): one count per bucket, buckets growing by :data:`GROWTH` (10 %) from
:data:`LOWEST` (100 µs) to :data:`HIGHEST` (60 s), one below and one above: 143
counts. Recording is O(1) (a logarithm and an increment), merging windows is adding
counts. A percentile is the nearest rank (:func:`meshxl.stats.quantile`: the value at
rank ``ceil(q * n)``) located in its bucket and reported as the bucket's geometric
middle, clamped to the smallest and largest latency of the span (kept exactly). How
exact: between 100 µs and 60 s the reported value is within ``sqrt(1.1) - 1`` = 4.9 %
of the exact nearest-rank percentile; below 100 µs within 50 µs; above 60 s it is the
largest latency seen (a lower bound at 60 s or more, where only "too slow" matters).

**One node, one view.** Each window keeps every reporting node's requests apart (its
*view*; at most :data:`MAX_VIEWS` nodes a window, any further ones pooled in one more
view), and a window's sample combines the views so that no node outweighs the others:
each percentile is the median of the views' percentiles, the error share the median
of their shares, and a view counts at most as many requests as the busiest other view
(a node flooding a host with answers, fast or slow, is one voice). With one reporting
node (meshxl's own Envoy in front of a cluster, say) it is that node's view unchanged.

Memory: a view with requests holds 143 four-byte counts (about 0.6 KB), a window
without requests none: at most 72 KB per host and reporting node busy in every window of
the last 60 s (five times that with :data:`MAX_VIEWS` nodes or more).
"""

from __future__ import annotations

import math
import statistics
from array import array
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["GROWTH", "HIGHEST", "KEEP", "LOWEST", "MAX_HOSTS", "MAX_VIEWS", "STATUS_SPAN",
           "WINDOW", "HostSample", "UpstreamSignals", "bucket_bounds", "status"]

WINDOW = 0.5
"""Seconds per window; windows are ``floor(at / WINDOW)`` on the Unix clock."""
KEEP = 120
"""Windows kept per host (60 s)."""
MAX_HOSTS = 10_000
"""(cluster, host) pairs remembered at most; the least recently recorded go first."""

MAX_VIEWS = 4
"""Reporting nodes kept apart per host and window; further ones share one more view."""

LOWEST = 1e-4
"""Seconds: the lower edge of the first log bucket (below it: one bucket)."""
HIGHEST = 60.0
"""Seconds: at or above it, one last bucket."""
GROWTH = 1.1
"""Each bucket's upper edge over its lower edge."""

_LOG_GROWTH = math.log(GROWTH)
_LOG_BUCKETS = math.ceil(math.log(HIGHEST / LOWEST) / _LOG_GROWTH)  # 140
_BUCKETS = _LOG_BUCKETS + 2  # [0, LOWEST), the log buckets, [HIGHEST, inf)
_OVER = _BUCKETS - 1
_PERCENTILES = (0.5, 0.9, 0.99)  # as meshxl.stats.PERCENTILES


def _bucket(seconds: float) -> int:
    if seconds < LOWEST:
        return 0
    if seconds >= HIGHEST:
        return _OVER
    return min(_LOG_BUCKETS, 1 + int(math.log(seconds / LOWEST) / _LOG_GROWTH))


def bucket_bounds(index: int) -> tuple[float, float]:
    """Bucket ``index``'s ``[lower, upper)`` edges in seconds (the last: ``[60, inf)``)."""
    if index == 0:
        return 0.0, LOWEST
    if index == _OVER:
        return HIGHEST, math.inf
    return LOWEST * GROWTH ** (index - 1), min(HIGHEST, LOWEST * GROWTH ** index)


@dataclass(frozen=True, slots=True)
class HostSample:
    """A host's requests over one window (or a merged span), as its Envoys saw them."""

    requests: int
    errors: int
    p50: float | None
    """Seconds; None when no latency was measured (TCP, or no requests)."""
    p90: float | None
    p99: float | None


_EMPTY = HostSample(0, 0, None, None, None)


class _View:
    """One node's requests to one host in one window: counts, errors, the latency
    histogram (made on the first measured latency) and the exact smallest and largest
    latency."""

    __slots__ = ("counts", "errors", "high", "low", "measured", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.measured = 0
        self.counts: array[int] | None = None
        self.low = math.inf
        self.high = -math.inf

    def add(self, seconds: float | None, failed: bool) -> None:
        self.requests += 1
        if failed:
            self.errors += 1
        if seconds is None:
            return
        if seconds < 0 or seconds != seconds:  # a clock step, or NaN: no latency known
            return
        if self.counts is None:
            self.counts = array("I", bytes(4 * _BUCKETS))
        self.counts[_bucket(seconds)] += 1
        self.measured += 1
        if seconds < self.low:
            self.low = seconds
        if seconds > self.high:
            self.high = seconds


class _Window:
    """One host's requests in one window, per reporting node (None: the pooled view of
    the nodes past :data:`MAX_VIEWS`)."""

    __slots__ = ("views",)

    def __init__(self) -> None:
        self.views: dict[str | None, _View] = {}

    def add(self, node: str, seconds: float | None, failed: bool) -> None:
        view = self.views.get(node)
        if view is None:
            key: str | None = node if len(self.views) < MAX_VIEWS else None
            view = self.views.get(key)
            if view is None:
                view = self.views[key] = _View()
        view.add(seconds, failed)


def _view_sample(views: Iterable[_View]) -> HostSample:
    """One node's views (of several windows) merged: percentiles over the merged
    histogram."""
    requests = errors = measured = 0
    counts = [0] * _BUCKETS
    low, high = math.inf, -math.inf
    for v in views:
        requests += v.requests
        errors += v.errors
        if v.counts is not None:
            measured += v.measured
            for i, n in enumerate(v.counts):
                if n:
                    counts[i] += n
            low, high = min(low, v.low), max(high, v.high)
    if requests == 0:
        return _EMPTY
    if measured == 0:
        return HostSample(requests, errors, None, None, None)
    p50, p90, p99 = (_percentile(counts, measured, q, low, high) for q in _PERCENTILES)
    return HostSample(requests, errors, p50, p90, p99)


def _merge(windows: Iterable[_Window]) -> HostSample:
    """Windows merged per reporting node, then the nodes' views combined so that none
    outweighs the others (the module's docstring)."""
    by_node: dict[str | None, list[_View]] = {}
    for w in windows:
        for node, view in w.views.items():
            by_node.setdefault(node, []).append(view)
    samples = [s for s in (_view_sample(vs) for vs in by_node.values()) if s.requests]
    if len(samples) <= 1:
        return samples[0] if samples else _EMPTY
    counts = sorted(s.requests for s in samples)
    busiest, second = counts[-1], counts[-2]
    requests = sum(min(s.requests, second if s.requests == busiest else busiest)
                   for s in samples)
    share = statistics.median(s.errors / s.requests for s in samples)

    def middle(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    return HostSample(requests, round(share * requests), middle([s.p50 for s in samples]),
                      middle([s.p90 for s in samples]), middle([s.p99 for s in samples]))


def _percentile(counts: list[int], n: int, q: float, low: float, high: float) -> float:
    """The nearest-rank ``q``-percentile (meshxl.stats.quantile's rank) as its bucket's
    geometric middle, clamped to ``[low, high]``."""
    rank = max(1, math.ceil(round(q * n, 9)))
    seen = 0
    index = _OVER
    for i, c in enumerate(counts):
        seen += c
        if seen >= rank:
            index = i
            break
    lower, upper = bucket_bounds(index)
    if index == 0:
        value = LOWEST / 2
    elif index == _OVER:
        value = high
    else:
        value = math.sqrt(lower * upper)
    return min(high, max(low, value))


class _Host:
    __slots__ = ("newest", "windows")

    def __init__(self) -> None:
        self.windows: dict[int, _Window] = {}
        self.newest = -1


class UpstreamSignals:
    """Requests per (cluster, upstream host) in windows; see the module's docstring."""

    def __init__(self, *, max_hosts: int = MAX_HOSTS) -> None:
        if max_hosts < 1:
            raise ValueError(f"max_hosts must be at least 1, got {max_hosts}")
        self.max_hosts = max_hosts
        self._hosts: OrderedDict[tuple[str, str], _Host] = OrderedDict()
        self._clusters: dict[str, set[str]] = {}
        self.forgotten = 0
        """Hosts forgotten to stay within ``max_hosts``."""

    def record(self, cluster: str, host: str, seconds: float | None, failed: bool,
               at: float, node: str = "") -> None:
        """One request to ``host`` of ``cluster`` at Unix time ``at``, as ``node`` saw
        it: its latency in seconds (None: not measured) and whether it failed. A request
        older than the host's kept windows is ignored."""
        index = math.floor(at / WINDOW)
        key = (cluster, host)
        state = self._hosts.get(key)
        if state is None:
            state = self._remember(key)
        window = state.windows.get(index)
        if window is None:
            if index <= state.newest - KEEP:
                return  # older than anything kept
            window = state.windows[index] = _Window()
            if index > state.newest:
                state.newest = index
                self._hosts.move_to_end(key)  # once per host and window, not per request
            if len(state.windows) > KEEP:
                oldest = state.newest - KEEP
                for k in [k for k in state.windows if k <= oldest]:
                    del state.windows[k]
        window.add(node, seconds, failed)

    def _remember(self, key: tuple[str, str]) -> _Host:
        while len(self._hosts) >= self.max_hosts:
            (cluster, host), _ = self._hosts.popitem(last=False)
            self._drop(cluster, host)
            self.forgotten += 1
        state = self._hosts[key] = _Host()
        self._clusters.setdefault(key[0], set()).add(key[1])
        return state

    def _drop(self, cluster: str, host: str) -> None:
        hosts = self._clusters.get(cluster)
        if hosts is not None:
            hosts.discard(host)
            if not hosts:
                del self._clusters[cluster]

    def _span(self, since: float, until: float) -> range:
        """The windows fully inside ``[since, until)``, at most the last KEEP."""
        first = math.ceil(since / WINDOW)
        last = math.floor(until / WINDOW) - 1
        return range(max(first, last - KEEP + 1), last + 1)

    def _in_span(self, cluster: str, span: range) -> Iterable[tuple[str, _Host]]:
        for host in sorted(self._clusters.get(cluster, ())):
            state = self._hosts[(cluster, host)]
            if span and state.newest >= span.start - KEEP:  # remembered, not long silent
                yield host, state

    def windows(self, cluster: str, since: float, until: float
                ) -> dict[str, list[HostSample]]:
        """Per host of ``cluster``, every window fully inside ``[since, until)`` (at most
        the last :data:`KEEP`), oldest first; a window without requests is
        ``HostSample(0, 0, None, None, None)``. Windows are closed when ``until`` is
        now or earlier. Hosts without a request in the KEEP windows before the span are
        left out."""
        span = self._span(since, until)
        out: dict[str, list[HostSample]] = {}
        for host, state in self._in_span(cluster, span):
            got = state.windows
            out[host] = [_merge((got[k],)) if k in got else _EMPTY for k in span]
        return out

    def summary(self, cluster: str, since: float, until: float) -> dict[str, HostSample]:
        """:meth:`windows`' span merged into one sample per host (percentiles over the
        merged histogram)."""
        span = self._span(since, until)
        out: dict[str, HostSample] = {}
        for host, state in self._in_span(cluster, span):
            got = state.windows
            out[host] = _merge(got[k] for k in span if k in got)
        return out

    def clusters(self) -> list[str]:
        """Clusters with a remembered host, sorted."""
        return sorted(self._clusters)

    def hosts(self) -> int:
        """(cluster, host) pairs remembered now."""
        return len(self._hosts)


STATUS_SPAN = 10.0
"""Seconds of each host's requests ``/v1/status`` shows (its ``upstream`` field)."""


def status(signals: UpstreamSignals, now: float, span: float = STATUS_SPAN
           ) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """Per cluster, per host: the summary of the closed windows of the last ``span``
    seconds before ``now`` (JSON-able: requests, errors, p50, p90, p99 in seconds)."""
    out: dict[str, dict[str, dict[str, float | int | None]]] = {}
    for cluster in signals.clusters():
        hosts = signals.summary(cluster, now - span, now)
        if hosts:
            out[cluster] = {host: {"requests": s.requests, "errors": s.errors, "p50": s.p50,
                                   "p90": s.p90, "p99": s.p99} for host, s in hosts.items()}
    return out
