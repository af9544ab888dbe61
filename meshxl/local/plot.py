"""The timeline picture of a failover run (``timeline.png`` of ``meshxl demo``).

Requests per member per :data:`BUCKET`, failed requests, the kill and the failover's
events (detection, xDS pushes, Envoy ACKs, session takeovers), with a second panel
zoomed on the kill. Drawing needs matplotlib (the ``demo`` extra), imported only when a
picture is drawn; :func:`timeline_series` (the numbers behind it) needs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .traffic import Record

BUCKET = 0.1
"""Timeline resolution, seconds."""




def timeline_series(records: Iterable[Record], started: float, end: float,
                    bucket: float = BUCKET) -> tuple[list[float], dict[str, list[int]],
                                                      list[int]]:
    """Bucket start times (s from ``started``), successes per member, failures per bucket."""
    count = max(1, math.ceil((end - started) / bucket))
    times = [round(i * bucket, 6) for i in range(count)]
    per_member: dict[str, list[int]] = {}
    failures = [0] * count
    for r in records:
        if r.method != "POST":
            continue
        i = min(count - 1, max(0, int((r.ended - started) / bucket)))
        if r.ok and r.member is not None:
            per_member.setdefault(r.member, [0] * count)[i] += 1
        elif not r.ok:
            failures[i] += 1
    return times, dict(sorted(per_member.items())), failures


def plot_timeline(path: Path, records: Sequence[Record], report: Mapping[str, Any],
                  started: float, end: float) -> None:
    """Requests per member per 100 ms, failures, and the failover's events."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times, per_member, failures = timeline_series(records, started, end)
    fo = report.get("failover") or {}
    kill_s = report.get("kill_at_s")
    events: list[tuple[str, list[float], str, str]] = []
    if fo.get("start_unix_ns"):
        events.append(("failover detected (control plane)",
                       [fo["start_unix_ns"] / 1e9 - started], "tab:orange", "--"))
    spans_at = _event_times(report, started)
    events += [("xDS push", spans_at["pushes"], "tab:blue", ":"),
               ("Envoy ACK", spans_at["acks"], "tab:green", ":"),
               ("session takeover", spans_at["takeovers"], "tab:purple", "-")]

    zoomed = kill_s is not None
    fig, axes = plt.subplots(2 if zoomed else 1, 1, figsize=(12, 8 if zoomed else 4.5),
                             squeeze=False)
    colors = {"a": "tab:blue", "b": "tab:orange", "c": "tab:green"}
    for k, ax in enumerate(axes[:, 0]):
        x = [t + BUCKET / 2 for t in times]
        for member, counts in per_member.items():
            ax.plot(x, counts, label=f"member {member}", color=colors.get(member),
                    linewidth=1.6, drawstyle="steps-mid")
        if any(failures):
            ax.bar(x, failures, width=BUCKET, color="red", label="failed requests",
                   zorder=3)
        if kill_s is not None:
            ax.axvline(kill_s, color="black", linewidth=2,
                       label=f"kill -9 member {report.get('killed_member')}")
        for label, xs, color, style in events:
            for i, ev in enumerate(xs):
                ax.axvline(ev, color=color, linestyle=style,
                           linewidth=0.8 if label == "session takeover" else 1.4,
                           alpha=0.35 if label == "session takeover" else 0.9,
                           label=label if i == 0 else None)
        ax.set_ylabel(f"requests / {int(BUCKET * 1000)} ms")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        if k == 0:
            ax.set_xlim(0, end - started)
            spoken = "" if report.get("protocol", "http") == "http" else \
                f"{report['protocol']}, "
            ax.set_title(f"meshxl demo ({spoken}{report.get('mode')}): {report.get('requests')} "
                         f"requests, {report.get('failed_requests')} failed, "
                         f"{report.get('lost_writes')} lost writes")
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
        else:
            assert kill_s is not None
            last = max([kill_s + 1.0] + [x for _, xs, _, _ in events for x in xs])
            rto_max = (report.get("rto_ms") or {}).get("max") or 0
            last = max(last, kill_s + rto_max / 1000)
            ax.set_xlim(kill_s - 0.5, min(end - started, last + 0.5))
            top = ax.get_ylim()[1]
            marks = [(kill_s, "kill -9")]
            if events and events[0][1]:
                marks.append((events[0][1][0], "control plane: detect, push, ACK "
                              f"({report.get('convergence_ms')} ms)"))
            for i, (x_at, text) in enumerate(marks):
                # The kill's label to the right of its line, the control plane's to the
                # left of its own, so neither runs under the legend.
                ax.annotate(text, (x_at, top), xytext=(4 if i == 0 else -4, -12),
                            textcoords="offset points", fontsize=8,
                            ha="left" if i == 0 else "right", backgroundcolor="white")
            if rto_max:
                ax.axvspan(kill_s, kill_s + rto_max / 1000, color="red", alpha=0.08,
                           label=f"until the last session recovered ({rto_max:.0f} ms)")
                ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
            ax.set_title("around the kill: detection, xDS push, Envoy ACK, takeovers "
                         f"(RTO p99 {(report.get('rto_ms') or {}).get('p99')} ms, "
                         f"convergence {report.get('convergence_ms')} ms)")
    axes[-1, 0].set_xlabel("seconds since traffic started")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _event_times(report: Mapping[str, Any], started: float) -> dict[str, list[float]]:
    fo = report.get("failover") or {}
    out: dict[str, list[float]] = {"pushes": [], "acks": [], "takeovers": []}
    for key in out:
        out[key] = [ns / 1e9 - started for ns in fo.get(f"_{key}_ns", [])]
    return out


__all__ = ["BUCKET", "plot_timeline", "timeline_series"]
