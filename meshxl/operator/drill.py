"""``meshxl drill``: Maestro's quarterly DR test, automated.

The controlled site failover procedure against a running deployment:

1. **preflight**: every member ready, every sidecar in sync, no site already offline,
   distribution verified, and every cluster on the site has a ready member elsewhere
   (otherwise taking the site offline would drop that cluster): refuse otherwise;
2. **offline**: take the site offline and wait until every Envoy acknowledged it;
3. **watch** for ``duration`` seconds: sample Envoy's per-endpoint request counters (with
   ``--envoy-admin``) to see traffic leave the site, and its listeners' counters of
   requests answered with a 5xx (failed requests, counted with or without traces);
4. **verify** the distribution with the site offline, and, given sidecars of the
   surviving site (``--check-sidecar``), the **data check**: every session written
   before and during the drill read back through them and compared with what etcd
   committed, with shards in each session's own shard (:mod:`meshxl.operator.consistency`);
5. **online**: bring the site back and wait for every Envoy;
6. **verify** once more;

then review the failover traces against the SLOs (with ``--traces`` and ``--slo``) and
write ``drill.json``, ``drill.md`` and ``timeline.png``. Anything going wrong after the
site went offline (a failed step, an error, Ctrl-C) brings the site back online before
the drill exits: a drill never leaves a site down.

Exit codes: 0 passed, 1 failed (aborted, verification failed or an objective breached),
2 refused (the deployment is not healthy) or bad input.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aetcd
import aiohttp

from meshxl.errors import Conflict, InputError
from meshxl.etcd.keys import Keys
from meshxl.operator.actions import set_site_admin
from meshxl.operator.consistency import (
    Baseline,
    Sharded,
    Sidecar,
    baseline,
    compare_sessions,
    data_check_refusals,
    sidecar_identity,
)
from meshxl.operator.drillreport import markdown, plot
from meshxl.operator.shards import read_map, shard_clients
from meshxl.operator.views import read_mesh, status_report, sync_report, verify
from meshxl.proxy.admin import EnvoyAdmin, Host
from meshxl.xds.upgrades import model_cluster

__all__ = ["DrillConfig", "DrillRefused", "DrillSettingsError", "run_drill"]

PASSED, FAILED, REFUSED = 0, 1, 2


class DrillRefused(Conflict):
    """The deployment is not healthy enough to drill; ``reasons`` says why."""

    def __init__(self, reasons: list[str]):
        super().__init__("; ".join(reasons))
        self.reasons = reasons


class DrillSettingsError(InputError, ValueError):
    """The drill's settings cannot be used (an SLO file, --slo without --traces): it
    refuses to start (exit :data:`REFUSED`)."""


class _Abort(Exception):
    """A step failed after the site went offline."""


@dataclass
class DrillConfig:
    site: str
    output_dir: Path
    duration: float = 30.0
    envoy_admin: list[str] = field(default_factory=list)
    traces: list[str] = field(default_factory=list)
    slo: list[str] = field(default_factory=list)
    converge_timeout: float = 30.0
    sample_interval: float = 0.5
    reason: str = "DR drill"
    model_text: str | None = None
    model_source: str | None = None
    trace_settle: float = 2.0
    check_sidecars: list[str] = field(default_factory=list)
    """Sidecars of the surviving site(s) the data check reads every session through."""
    sidecar_token: str | None = field(default=None, repr=False)
    """Seconds to wait after the drill for processes to flush their spans."""


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


# -- preflight --------------------------------------------------------------------------------


def preflight_problems(site: str, status: dict[str, Any], sync: dict[str, Any],
                       verified: dict[str, Any]) -> list[str]:
    """Every reason not to start (pure: from the status, sync and verify reports)."""
    reasons = []
    if status.get("model_error"):
        reasons.append(f"the model is invalid: {status['model_error']}")
    if not status["clusters"]:
        reasons.append("no clusters in the model")
    for offline in status["sites_offline"]:
        reasons.append(f"site {offline} is already offline")
    on_site = False
    for c in status["clusters"]:
        here = [m for m in c["members"] if m["site"] == site]
        elsewhere = [m for m in c["members"] if m["site"] != site and m["state"] == "ready"]
        on_site = on_site or bool(here)
        if here and not elsewhere:
            reasons.append(f"cluster {c['name']} has no ready member outside site {site}: "
                           "taking the site offline would leave it without service")
        for m in c["members"]:
            if m["state"] != "ready":
                detail = f" ({', '.join(m['problems'])})" if m["problems"] else ""
                reasons.append(f"{c['name']}/{m['name']} is {m['state']}{detail}")
    if status["clusters"] and not on_site:
        sites = sorted({m["site"] for c in status["clusters"] for m in c["members"]})
        reasons.append(f"no member is on site {site} (sites: {', '.join(sites) or 'none'})")
    for s in sync["sidecars"]:
        if not s["ready"]:
            why = "; ".join(s.get("reasons") or []) or "not ready"
            reasons.append(f"sidecar {s['cluster']}/{s['member']} is not in sync: {why}")
    for p in verified["mismatches"]:
        reasons.append(f"distribution not verified: {p['message']}")
    return reasons


# -- traffic samples ----------------------------------------------------------------------------


async def _host_counters(http: aiohttp.ClientSession, url: str) -> dict[str, int]:
    """``cluster/address`` -> rq_total, from one Envoy's ``/clusters?format=json`` (a
    model cluster's WebSockets, on its upgrades twin, counted with it)."""
    clusters = await EnvoyAdmin(url, session=http).clusters()
    return host_counters(clusters)


def host_counters(clusters: Mapping[str, list[Host]]) -> dict[str, int]:
    """``model cluster/address`` -> requests, summed over the Envoy clusters that serve
    the model cluster (:func:`meshxl.xds.upgrades.model_cluster`)."""
    out: dict[str, int] = {}
    for name, hosts in clusters.items():
        for h in hosts:
            key = f"{model_cluster(name)}/{h.endpoint}"
            out[key] = out.get(key, 0) + h.rq_total
    return out


#: The HTTP connection managers of meshxl's listeners (``stat_prefix`` is the listener
#: name, ``meshxl_ADDRESS_PORT``): every request a client sent through Envoy, answered
#: by a member or by Envoy itself (503 no healthy upstream, 504 timeouts).
_ANSWERS = r"^http\.meshxl_.*\.downstream_rq_(5xx|completed)$"


async def _answer_counters(http: aiohttp.ClientSession, url: str) -> tuple[int, int]:
    """(requests answered with a 5xx, requests answered) by one Envoy's listeners."""
    stats = await EnvoyAdmin(url, session=http).stats(filter=_ANSWERS)
    failed = sum(v for k, v in stats.items() if k.endswith(".downstream_rq_5xx"))
    answered = sum(v for k, v in stats.items() if k.endswith(".downstream_rq_completed"))
    return failed, answered


class _Sampler:
    """Requests per site over time, from Envoy's per-endpoint counters."""

    def __init__(self, urls: list[str], sites: dict[str, str], interval: float):
        self.urls = urls
        self.sites = sites  # cluster/address -> site
        self.interval = interval
        # {"t": ts, "since": ts, "sites": {site: requests}, "failed": n, "answered": n}:
        # the requests counted between the previous sample's first read ("since") and
        # this sample's last ("t"). Reading every Envoy's counters takes time (a busy
        # Envoy, a slow admin), so a sample stamped after an event may still hold
        # requests sent before it.
        self.samples: list[dict[str, Any]] = []
        self.errors = 0
        self._last: dict[str, int] | None = None
        self._last_read = 0.0

    async def sample(self, http: aiohttp.ClientSession) -> None:
        reading = time.time()
        counts: dict[str, int] = {}
        for url in self.urls:
            try:
                for key, value in (await _host_counters(http, url)).items():
                    counts[f"{url}|{key}"] = value
                counts[f"{url}|failed"], counts[f"{url}|answered"] = \
                    await _answer_counters(http, url)
            except (aiohttp.ClientError, TimeoutError, ValueError):
                self.errors += 1
        now = time.time()
        if self._last is not None:
            per_site: dict[str, int] = {}
            answers = {"failed": 0, "answered": 0}
            for key, value in counts.items():
                delta = max(0, value - self._last.get(key, value))
                kind = key.split("|", 1)[1]
                if kind in answers:
                    answers[kind] += delta
                    continue
                site = self.sites.get(kind)
                if site is None:
                    continue  # not a meshxl member (the xDS or OTLP cluster)
                per_site[site] = per_site.get(site, 0) + delta
            self.samples.append({"t": now, "since": self._last_read, "sites": per_site,
                                 **answers})
        self._last, self._last_read = counts, reading

    async def run(self, stop: asyncio.Event) -> None:
        if not self.urls:
            return
        timeout = aiohttp.ClientTimeout(total=max(1.0, self.interval * 2))
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while not stop.is_set():
                await self.sample(http)
                try:
                    async with asyncio.timeout(self.interval):
                        await stop.wait()
                except TimeoutError:
                    pass
            await self.sample(http)

    def requests(self, site: str, start: float, end: float, *, within: bool = False) -> int:
        """Requests to ``site`` in the samples stamped in ``(start, end]``; ``within``:
        only those whose counters were all read after ``start`` (none of their requests
        can have been sent before it)."""
        return sum(s["sites"].get(site, 0) for s in self.samples
                   if start < s["t"] <= end and (not within or s.get("since", s["t"]) >= start))

    def answers(self, kind: str, start: float, end: float) -> int:
        """Requests ``failed`` (5xx) or ``answered`` through Envoy in ``(start, end]``."""
        return sum(s.get(kind, 0) for s in self.samples if start < s["t"] <= end)


# -- the drill -------------------------------------------------------------------------------


class _Drill:
    def __init__(self, client: aetcd.Client, keys: Keys, cfg: DrillConfig,
                 say: Callable[[str], None], connect: Callable[[str], Any] | None = None):
        self.client, self.keys, self.cfg, self.say = client, keys, cfg, say
        self.connect = connect
        """Opens a shard's etcd client (an async context manager), for the data check
        with shards."""
        self.steps: list[dict[str, Any]] = []
        self.events: dict[str, float] = {}
        self.checkers: list[Sidecar] = []
        self.baseline: dict[str, Baseline] = {}
        self.sharded: Sharded | None = None
        self.resources = contextlib.AsyncExitStack()
        """What the drill holds open until it ends: the shards' etcd clients."""

    async def _verify(self, settle: float) -> dict[str, Any]:
        return await verify(self.client, self.keys, self.cfg.envoy_admin, self.cfg.model_text,
                            self.cfg.model_source, settle=settle)

    def step(self, name: str, ok: bool, started: float, detail: str = "",
             **extra: Any) -> None:
        ended = time.time()
        self.steps.append({"step": name, "ok": ok, "started": _iso(started),
                           "seconds": round(ended - started, 3), "detail": detail, **extra})
        self.say(f"{'ok  ' if ok else 'FAIL'} {name} ({ended - started:.1f} s)"
                 + (f": {detail}" if detail else ""))
        if not ok:
            raise _Abort(f"{name}: {detail}")

    async def preflight(self) -> tuple[dict[str, Any], dict[str, str]]:
        started = time.time()
        read = await read_mesh(self.client, self.keys, self.cfg.model_text,
                               self.cfg.model_source)
        status, sync = status_report(read), sync_report(read)
        verified = await self._verify(settle=5.0)
        reasons = preflight_problems(self.cfg.site, status, sync, verified)
        if reasons:
            self.steps.append({"step": "preflight", "ok": False, "started": _iso(started),
                               "seconds": round(time.time() - started, 3),
                               "detail": "; ".join(reasons)})
            raise DrillRefused(reasons)
        self.step("preflight", True, started,
                  f"{len(status['clusters'])} clusters, {len(sync['sidecars'])} sidecars, "
                  f"{len(verified['nodes'])} Envoy nodes verified")
        sites = {}
        for c in status["clusters"]:
            for m in c["members"]:
                sites[f"{c['name']}/{m['address']}"] = m["site"]
        return status, sites

    async def converge(self, name: str, event: str | None = None) -> None:
        started = time.time()
        report = await self._verify(settle=self.cfg.converge_timeout)
        if event is not None:
            self.events[event] = time.time()
        self.step(name, report["ok"], started, "every Envoy acknowledged" if report["ok"]
                  else "; ".join(p["message"] for p in report["mismatches"]),
                  mismatches=report["mismatches"])

    async def data_baseline(self) -> None:
        """Who reads the sessions back (sidecars outside the site, ready), and every
        session's revision before the drill."""
        started = time.time()
        reasons = []
        shard_map, _ = await read_map(self.client, self.keys)
        for url in self.cfg.check_sidecars:
            try:
                sidecar = await sidecar_identity(url, self.cfg.sidecar_token)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                reasons.append(f"--check-sidecar {url}: cannot read its status: "
                               f"{type(exc).__name__}: {exc}")
                continue
            if sidecar.site == self.cfg.site:
                reasons.append(f"--check-sidecar {url} ({sidecar.member}) is on site "
                               f"{self.cfg.site}: the data check reads from the surviving site")
            elif not sidecar.ready:
                reasons.append(f"--check-sidecar {url} ({sidecar.member}) is not ready")
            self.checkers.append(sidecar)
        reasons += data_check_refusals(shard_map, self.checkers)
        if shard_map is not None and self.connect is None:
            reasons.append("--check-sidecar: sessions are sharded, and the drill was given "
                           "no way to connect to the shards' etcd clusters")
        if reasons:
            raise DrillRefused(reasons)
        if shard_map is not None:
            assert self.connect is not None
            clients = await self.resources.enter_async_context(
                shard_clients(shard_map.shards, self.connect))
            self.sharded = Sharded(shard_map, clients)
        for cluster in sorted({s.cluster for s in self.checkers}):
            self.baseline[cluster] = await baseline(self.client, self.keys, cluster,
                                                    self.sharded)
        self.step("data baseline", True, started, ", ".join(
            f"{c}: {len(b.sessions)} sessions{self._per_shard(b.sessions)}"
            for c, b in self.baseline.items()))

    def _per_shard(self, sessions: dict[str, Any]) -> str:
        """`` (s1 10, s2 12)``: sessions per shard, with shards."""
        if self.sharded is None:
            return ""
        counts = Counter(self.sharded.map.of(s).name for s in sessions)
        return " (" + ", ".join(f"{n} {counts[n]}" for n in self.sharded.map.names) + ")"

    async def data_check(self) -> list[dict[str, Any]]:
        """Every session before and during the drill, through each checking sidecar."""
        started = time.time()
        results = [await compare_sessions(self.client, self.keys, s, self.cfg.sidecar_token,
                                          self.baseline.get(s.cluster, Baseline()),
                                          self.sharded)
                   for s in self.checkers]
        ok = all(r["ok"] for r in results)
        detail = "; ".join(
            f"{r['member'] or r['sidecar']}: {r['matched']}/{r['sessions']} sessions match "
            f"etcd ({r['written_during']} written during the drill)"
            + ("" if r["ok"] else ", " + ", ".join(f"{n} {k}" for k, n in r["problems"].items()))
            for r in results)
        ended = time.time()
        self.steps.append({"step": "data check", "ok": ok, "started": _iso(started),
                           "seconds": round(ended - started, 3), "detail": detail})
        self.say(f"{'ok  ' if ok else 'FAIL'} data check ({ended - started:.1f} s): {detail}")
        return results

    async def set_site(self, offline: bool) -> None:
        started = time.time()
        revision = await set_site_admin(self.client, self.keys, self.cfg.site, offline,
                                        self.cfg.reason)
        self.events["offline" if offline else "online"] = started
        self.step(f"site {'offline' if offline else 'online'}", True, started,
                  f"etcd revision {revision}")


async def run_drill(client: aetcd.Client, keys: Keys, cfg: DrillConfig,
                    say: Callable[[str], None] = print,
                    connect: Callable[[str], Any] | None = None) -> tuple[int, dict[str, Any]]:
    """Run the drill; returns (exit code, report). Writes the report files.
    ``connect(urls)``: an etcd client (an async context manager) for a session shard,
    which the data check needs when sessions are sharded (the command's, with the
    main cluster's TLS and credential options)."""
    from meshxl.telemetry.slo import SloError, load_slos

    try:
        objectives = load_slos(cfg.slo) if cfg.slo else []
    except SloError as exc:
        raise DrillSettingsError(str(exc)) from None
    if objectives and not cfg.traces:
        raise DrillSettingsError("--slo needs --traces: the objectives are judged on "
                                 "failover traces")
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    drill = _Drill(client, keys, cfg, say, connect)
    started = time.time()
    report: dict[str, Any] = {"site": cfg.site, "started": _iso(started),
                              "duration_s": cfg.duration, "envoy_admin": cfg.envoy_admin,
                              "result": "passed", "steps": drill.steps}
    sampler: _Sampler | None = None
    offline = False
    code = PASSED
    try:
        _, sites = await drill.preflight()
        if cfg.check_sidecars:
            await drill.data_baseline()
        sampler = _Sampler(cfg.envoy_admin, sites, cfg.sample_interval)
        stop = asyncio.Event()
        sampling = asyncio.create_task(sampler.run(stop))
        try:
            await asyncio.sleep(min(2.0, cfg.sample_interval * 2))  # a baseline
            offline = True
            await drill.set_site(offline=True)
            await drill.converge("offline converged", "offline converged")
            watch = time.time()
            await asyncio.sleep(cfg.duration)
            drill.step("watch", True, watch, f"{cfg.duration:g} s with site {cfg.site} offline")
            await drill.converge("verify offline")
            if drill.checkers:
                report["data"] = await drill.data_check()
            await drill.set_site(offline=False)
            offline = False
            await drill.converge("online converged", "online converged")
            await drill.converge("verify online")
            if sampler.urls:  # a little of the traffic coming back, for the report
                await asyncio.sleep(min(3.0, max(cfg.duration, cfg.sample_interval * 2)))
        finally:
            stop.set()
            await sampling
    except DrillRefused as refused:
        report["result"] = "refused"
        report["refused"] = refused.reasons
        code = REFUSED
    except (_Abort, Exception, asyncio.CancelledError, KeyboardInterrupt) as exc:
        report["result"] = "aborted"
        report["abort_reason"] = str(exc) or type(exc).__name__
        code = FAILED
        if offline:
            say(f"aborting: {report['abort_reason']}; bringing site {cfg.site} back online")
            report["restored"] = await _restore(client, keys, cfg)
        if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
            _write(cfg.output_dir, report, sampler, drill.events)
            raise
    finally:
        with contextlib.suppress(Exception):  # a client that fails to close loses no report
            await drill.resources.aclose()
    report["ended"] = _iso(time.time())
    if code == PASSED and not all(r["ok"] for r in report.get("data", [])):
        report["result"], code = "failed", FAILED
    if sampler is not None:
        report["traffic"] = _traffic(sampler, cfg.site, drill.events)
        if code == PASSED and (report["traffic"].get("moved") is False
                               or report["traffic"].get("failed_requests", 0) > 0):
            report["result"], code = "failed", FAILED
    if code != REFUSED and objectives:
        await asyncio.sleep(cfg.trace_settle)
        report["slo"] = _review(cfg.traces, objectives, started)
        if not report["slo"]["met"] and code == PASSED:
            report["result"], code = "failed", FAILED
    _write(cfg.output_dir, report, sampler, drill.events)
    return code, report


async def _restore(client: aetcd.Client, keys: Keys, cfg: DrillConfig) -> bool:
    """Site back online, whatever happened; True once etcd has it."""
    for _ in range(5):
        try:
            await set_site_admin(client, keys, cfg.site, False, cfg.reason)
            return True
        except Exception:  # etcd trouble: try again, then report
            await asyncio.sleep(1.0)
    return False


def _traffic(sampler: _Sampler, site: str, events: dict[str, float]) -> dict[str, Any]:
    """Requests per phase to the drilled site and elsewhere; did the traffic move?"""
    if not sampler.urls:
        return {"sampled": False, "note": "no --envoy-admin: traffic not sampled"}
    first = sampler.samples[0]["t"] - sampler.interval if sampler.samples else 0.0
    end = sampler.samples[-1]["t"] if sampler.samples else 0.0
    off = events.get("offline converged", events.get("offline", end))
    on = events.get("online", end)

    def phase(a: float, b: float, within: bool = False) -> dict[str, int]:
        sites = {s for sample in sampler.samples for s in sample["sites"]}
        return {s: sampler.requests(s, a, b, within=within) for s in sorted(sites)}

    # Allow one sample interval after convergence for requests already in flight, and
    # count only samples read wholly after it: one stamped later may span the move.
    during = phase(off + sampler.interval, on, within=True)
    elsewhere = sum(v for s, v in during.items() if s != site)
    moved = None if elsewhere == 0 and during.get(site, 0) == 0 else during.get(site, 0) == 0
    return {"sampled": True, "before": phase(first, events.get("offline", end)),
            "during": during, "after": phase(on, end), "moved": moved,
            "failed_requests": sampler.answers("failed", first, end),
            "answered_requests": sampler.answers("answered", first, end),
            "errors": sampler.errors}


def _review(traces: list[str], objectives: list[Any], since: float) -> dict[str, Any]:
    from meshxl.telemetry.otlpjson import TraceFileError, read_spans
    from meshxl.telemetry.slo import report_to_json, review

    try:
        spans = [s for s in read_spans(traces) if s.start_ns >= int(since * 1e9)]
    except TraceFileError as exc:
        return {"met": False, "error": str(exc), "objectives": [], "failovers": 0}
    return report_to_json(review(spans, objectives))


def _write(out: Path, report: dict[str, Any], sampler: _Sampler | None,
           events: dict[str, float]) -> None:
    report["files"] = {"json": str(out / "drill.json"), "markdown": str(out / "drill.md")}
    if sampler is not None and sampler.samples:
        try:
            plot(out / "timeline.png", sampler, events, report["site"])
            report["files"]["timeline"] = str(out / "timeline.png")
        except Exception as exc:  # a missing plotting library must not lose the report
            report["timeline_error"] = f"{type(exc).__name__}: {exc}"
    (out / "drill.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "drill.md").write_text(markdown(report))
