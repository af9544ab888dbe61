"""The DR drill's report for people (pure but for the timeline picture): Markdown with
every value from outside escaped, and the requests-per-site timeline
(:mod:`meshxl.operator.drill` runs the drill and writes both)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

__all__ = ["markdown", "plot"]


class Sampled(Protocol):
    """What the timeline reads of the drill's traffic sampler."""

    interval: float
    samples: list[dict[str, Any]]


_MD_SPECIAL = str.maketrans({c: f"\\{c}" for c in "\\`*_{}[]<>()#|!~&"})


def _md(value: Any) -> str:
    """Text from etcd, Envoy or an operator as literal Markdown: one line (control
    characters escaped), every character Markdown or HTML would act on escaped."""
    text = str(value)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                       for c in text)
    return text.translate(_MD_SPECIAL)


def markdown(report: dict[str, Any]) -> str:
    """The drill report for people (pure); every value that came from outside goes
    through :func:`_md`."""
    lines = [f"# DR drill: site {_md(report['site'])}", "",
             f"Result: **{report['result']}** (started {report['started']}, "
             f"{report['duration_s']:g} s offline)", ""]
    if report.get("refused"):
        lines += ["Refused to start:", ""] + [f"- {_md(r)}" for r in report["refused"]] + [""]
    if report.get("abort_reason"):
        lines += [f"Aborted: {_md(report['abort_reason'])}; site restored online: "
                  f"{report.get('restored')}", ""]
    lines += ["| step | ok | seconds | detail |", "|---|---|---|---|"]
    for s in report["steps"]:
        detail = _md(s["detail"])
        lines.append(f"| {_md(s['step'])} | {'yes' if s['ok'] else 'NO'} | {s['seconds']} | "
                     f"{detail} |")
    traffic = report.get("traffic")
    if traffic and traffic.get("sampled"):
        lines += ["", "Requests per site (Envoy endpoint counters):", "",
                  "| phase | " + " | ".join(_md(s) for s in sorted(set().union(
                      traffic["before"], traffic["during"], traffic["after"]))) + " |"]
        sites = sorted(set().union(traffic["before"], traffic["during"], traffic["after"]))
        lines.append("|---|" + "---|" * len(sites))
        for phase in ("before", "during", "after"):
            lines.append(f"| {phase} | " + " | ".join(str(traffic[phase].get(s, 0))
                                                      for s in sites) + " |")
        lines += ["", f"Traffic left the site: {traffic['moved']}",
                  "", f"Failed requests (answered 5xx by Envoy's listeners): "
                  f"{traffic.get('failed_requests', 0)} of {traffic.get('answered_requests', 0)}"]
    for data in report.get("data", []):
        problems = ", ".join(f"{n} {_md(k)}" for k, n in data["problems"].items()) or "none"
        lines += ["", f"Data check through {_md(data['member'])} (site {_md(data['site'])}, "
                  f"cluster {_md(data['cluster'])}): {data['matched']} of {data['sessions']} "
                  f"sessions match etcd, {data['written_during']} written during the drill; "
                  f"problems: {problems}"]
        for shard in data.get("shards", []):
            found = ", ".join(f"{n} {_md(k)}" for k, n in shard["problems"].items()) or "none"
            lines += [f"- shard {_md(shard['shard'])} (etcd revision {shard['at_revision']}): "
                      f"{shard['matched']} of {shard['sessions']} sessions match; problems: "
                      f"{found}"]
        for kind, names in data["named"].items():
            lines += [f"- {_md(kind)}: " + ", ".join(_md(n) for n in names)]
        for where, why in (data.get("history") or {}).items():
            lines += [f"- etcd's history since the baseline not replayed ({_md(where)}): "
                      f"{_md(why)}; sessions written and gone during the drill not checked"]
    slo = report.get("slo")
    if slo:
        lines += ["", f"SLO review: {slo['failovers']} failover(s), "
                  f"{'all objectives met' if slo['met'] else 'BREACHED'}", "",
                  "| objective | good/total | p50 | p99 | met |", "|---|---|---|---|---|"]
        for o in slo["objectives"]:
            lines.append(f"| {_md(o['name'])} | {o['good']}/{o['total']} | {o['p50']} | "
                         f"{o['p99']} | {'yes' if o['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def plot(path: Path, sampler: Sampled, events: dict[str, float], site: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = sampler.samples[0]["t"]
    sites = sorted({s for sample in sampler.samples for s in sample["sites"]})
    fig, ax = plt.subplots(figsize=(10, 4))
    for s in sites:
        xs = [sample["t"] - t0 for sample in sampler.samples]
        ys = [sample["sites"].get(s, 0) / sampler.interval for sample in sampler.samples]
        ax.plot(xs, ys, label=f"site {s}" + (" (drilled)" if s == site else ""))
    for name, when in sorted(events.items(), key=lambda kv: kv[1]):
        ax.axvline(when - t0, color="grey", linestyle=":", linewidth=1)
        ax.annotate(name, (when - t0, ax.get_ylim()[1] * 0.95),
                    rotation=90, fontsize=7, va="top")
    ax.set_xlabel("seconds")
    ax.set_ylabel("requests/s through Envoy")
    ax.set_title(f"DR drill: site {site}")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
