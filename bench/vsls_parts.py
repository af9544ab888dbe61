"""The isolation parts of ``bench/vsls.py``: one tenant flooding writes at its quota
beside the others' load, and one tenant's etcd credentials against another tenant's
session on an etcd with authentication on."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from vsls_bed import Bed, Load

from meshxl.etcd.keys import Keys
from meshxl.local.procs import Owner, run
from meshxl.local.servers import HOST, start_etcd
from meshxl.model.placement import PoolMember, VirtualRoles, eligible, standby_shares
from meshxl.stats import quantile

FLOOD_WRITERS = 8
"""The flooding tenant's concurrent writers (one request at a time each, no pause)."""
FLOODER_START = 3.0
"""Seconds the flooder's process is given to start before the first window."""
TAIL = 3.0
"""Seconds after the last window before anything else is asked of the flooder's sidecar."""
ROOT_PASSWORD = "vsls-bench-root"


def roles_of(report: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """VS -> (active, standby) of a ``meshxl vs list --output json``."""
    return {v["name"]: (v["active"], v["standby"]) for v in report["virtual_systems"]}


def join_moves(before: Mapping[str, Any], after: Mapping[str, Any], new: str) -> dict[str, Any]:
    """The roles a join moved, counted as ``scripts/vsls_placement.py`` counts them: a
    role moved is a VS's active or standby on another member than before; the ideal
    is the joiner's fair share of active roles (from ``meshxl vs list``) and its fair
    share of standbys where the actives now are; the standbys the site rule sends
    across (a VS whose active moved to the joiner's site had its standby there) are
    counted apart."""
    b, a = roles_of(before), roles_of(after)
    listed = after["pools"][0]["members"]
    members = [PoolMember(m["name"], m["site"] or "", m["capacity"]) for m in listed]
    actives = [vs for vs in b if a[vs][0] != b[vs][0]]
    standbys = [vs for vs in b if a[vs][1] != b[vs][1]]
    allowed = set(eligible(new, members))
    forced = [vs for vs in actives if a[vs][0] == new and b[vs][1] not in allowed]
    placement = {vs: VirtualRoles(vs, (act,)) for vs, (act, _) in a.items()}
    share = round(standby_shares(placement, members, dict.fromkeys(a, 1))[new][1], 3)
    ideal = next(m["fair_share"] for m in listed if m["name"] == new)
    free = len(standbys) - len(forced)
    return {"ideal": ideal, "standby_ideal": share,
            "active_moved": len(actives), "standby_moved": len(standbys),
            "standby_site_forced": len(forced),
            "active_to_new": sum(1 for vs in actives if a[vs][0] == new),
            "standby_to_new": sum(1 for vs in standbys if a[vs][1] == new),
            "active_ratio": round(len(actives) / ideal, 3) if ideal else None,
            "standby_ratio": round(free / share, 3) if share else None,
            "roles_ratio": (round((len(actives) + free) / (ideal + share), 3)
                            if ideal + share else None),
            "site_forced_ratio": round(len(forced) / ideal, 3) if ideal else None,
            "active_moved_vss": sorted(actives)}


def quotas_available() -> bool:
    """Whether the sidecar enforces ``sessions.quota`` in this checkout."""
    return importlib.util.find_spec("meshxl.statesync.quota") is not None


def grants_available() -> bool:
    """Whether ``meshxl etcd grant`` (a role per cluster) is in this checkout."""
    return importlib.util.find_spec("meshxl.etcd.roles") is not None


def _p99(values: Sequence[float]) -> float | None:
    v = quantile(list(values), 0.99)
    return None if v is None else round(v * 1000, 2)


async def _quota_refused(url: str) -> float | None:
    """``meshxl_statesync_quota_refused_total`` (every label summed) of a sidecar."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http, \
                http.get(f"{url}/metrics") as resp:
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError):
        return None
    found = [float(m.group(1)) for m in re.finditer(
        r"^meshxl_statesync_quota_refused_total(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M)]
    return sum(found) if found else 0.0


def cpu_seconds(pid: int | None) -> float | None:
    """A process's CPU seconds so far (user + system, from ``/proc``), None if gone."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cores(after: float | None, before: float | None, seconds: float) -> float | None:
    return None if after is None or before is None else round((after - before) / seconds, 3)


KINDS = ("quiet", "flood", "at_quota")
"""The flood part's windows: nobody flooding; the flooder with no pause; the flooder
paced at its quota (every write within it: what the quota lets any tenant write)."""


def flood_schedule(start: float, window: float, rounds: int) -> list[tuple[str, float, float]]:
    """The flood part's windows from ``start``: ``rounds`` of each of :data:`KINDS`,
    each round's order turned by one, so that no kind always follows another."""
    kinds = [KINDS[(r + i) % len(KINDS)] for r in range(rounds) for i in range(len(KINDS))]
    return [(kind, start + i * window, start + (i + 1) * window)
            for i, kind in enumerate(kinds)]


def window_p99s(records: Sequence[Any], windows: Sequence[tuple[str, float, float]],
                skip_vs: str, on_member: set[str] | None = None) -> dict[str, Any]:
    """Per window kind: the p99 (ms) and count of the acknowledged writes sent in it,
    the VS ``skip_vs`` left out (and, given ``on_member``, only those VSs)."""
    per: dict[str, list[float]] = {kind: [] for kind, _, _ in windows}
    for r in records:
        if r.vs == skip_vs or not (r.write and r.ok) or (
                on_member is not None and r.vs not in on_member):
            continue
        for kind, s, e in windows:
            if s <= r.sent < e:
                per[kind].append(r.ended - r.sent)
                break
    return {kind: {"p99": _p99(v), "n": len(v)} for kind, v in per.items()}


def _ratio(p99s: Mapping[str, Any], kind: str) -> float | None:
    q, k = p99s["quiet"]["p99"], p99s[kind]["p99"]
    return round(k / q, 3) if q and k else None


def median_p99s(per_window: Sequence[Mapping[str, Any]], who: str) -> dict[str, Any]:
    """Per window kind, the median of its windows' p99s (``who``: ``all`` or
    ``member``): one window stalled by the machine's other work moves it little, where
    it makes the p99 of the kind's writes pooled."""
    out: dict[str, Any] = {}
    for kind in KINDS:
        values = [w[who]["p99"] for w in per_window if w["kind"] == kind
                  and w[who]["p99"] is not None]
        out[kind] = {"p99": round(statistics.median(values), 2) if values else None,
                     "n": len(values)}
    return out


async def flood_part(bed: Bed, traffic: Load, window: float, rounds: int, quota: int,
                     interval: float) -> dict[str, Any]:
    """The first VS writes at its active's sidecar from a process of its own
    (``bench/vsls_flooder.py``, as a tenant's app does: :data:`FLOOD_WRITERS` writers)
    in ``rounds`` x :data:`KINDS` windows: not at all, flooding (no pause,
    ``Retry-After`` ignored) and paced at its quota. The other tenants' acknowledged
    writes through Envoy in the flood (and at-quota) windows are compared with the
    quiet ones, all of them and those whose active is the flooder's member: the median
    of the kind's windows' p99s (:func:`median_p99s`; the pooled p99s beside). Per
    window kind, CPU (cores) of the flooder's sidecar, of the flooder and of this
    process (the load and its measurement)."""
    flooder = bed.vss[0]
    report = await bed.vs_list()
    actives = {v["name"]: v["active"] for v in report["virtual_systems"]}
    active = actives[flooder]
    member = bed.member(active)
    sidecar = f"http://{HOST}:{member.sidecar_port}"
    refused_before = await _quota_refused(sidecar)
    steady_interval, traffic.interval = traffic.interval, interval
    await asyncio.sleep(interval + 1.0)  # every session at its new pace
    # The flooder starts (Python, aiohttp) before the first window, then waits for its own.
    windows = flood_schedule(time.time() + FLOODER_START, window, rounds)
    out = bed.owner.path("flood") / "statuses.json"
    argv = [sys.executable, str(Path(__file__).with_name("vsls_flooder.py")),
            "--url", sidecar, "--vs", flooder, "--writers", str(FLOOD_WRITERS),
            "--rate", str(quota), "--output", str(out)]
    for kind, s, e in windows:
        if kind != "quiet":
            argv += ["--window" if kind == "flood" else "--paced", repr(s), repr(e)]
    proc = bed.owner.spawn(bed.owner.unique_name("flooder"), argv)
    procs = {"sidecar": member.procs[-1].pid, "flooder": proc.pid}
    cores: dict[str, dict[str, float]] = {kind: {} for kind in KINDS}
    for kind, s, e in windows:
        await asyncio.sleep(max(0.0, s - time.time()))
        if proc.returncode not in (None, 0):  # it refused the windows, or died: say so now
            raise OSError(f"the flooder exited {proc.returncode}: {proc.tail(10)}")
        before = {n: cpu_seconds(pid) for n, pid in procs.items()}
        bench_before = time.process_time()
        await asyncio.sleep(max(0.0, e - time.time()))
        used = {n: (cpu_seconds(pid) or 0.0) - (before[n] or 0.0) for n, pid in procs.items()}
        used["bench"] = time.process_time() - bench_before
        for n, v in used.items():
            cores[kind][n] = cores[kind].get(n, 0.0) + v / (rounds * window)
    code = await proc.wait_exit(30.0)
    if code != 0:
        raise OSError(f"the flooder exited {code}: {proc.tail(10)}")
    # The last window's writes still under way: reading the sidecar's metrics (every
    # VS's) would weigh on them.
    await asyncio.sleep(TAIL)
    traffic.interval = steady_interval
    refused_after = await _quota_refused(sidecar)
    seen = iter(json.loads(out.read_text())["statuses"])
    statuses: dict[str, dict[int, int]] = {"flood": {}, "at_quota": {}}
    for kind, _, _ in windows:
        if kind != "quiet":
            for status, n in next(seen).items():
                statuses[kind][int(status)] = statuses[kind].get(int(status), 0) + n

    on_member = {vs for vs, a in actives.items() if a == active}
    every = window_p99s(traffic.records, windows, flooder)
    near = window_p99s(traffic.records, windows, flooder, on_member)
    per_window = [{"kind": kind, **{name: window_p99s(traffic.records, [(kind, s, e)],
                                                      flooder, only)[kind]
                                    for name, only in (("all", None), ("member", on_member))}}
                  for kind, s, e in windows]
    seconds = rounds * window
    # The other tenants' acknowledged writes a second in the quiet windows: the pool's
    # write load the flooder's quota is a share of.
    others_wps = round(every["quiet"]["n"] / seconds, 1)
    accepted = {kind: sum(n for st, n in statuses[kind].items() if 200 <= st < 300)
                for kind in statuses}
    refused = (None if refused_after is None or refused_before is None
               else refused_after - refused_before)
    mid, mid_near = median_p99s(per_window, "all"), median_p99s(per_window, "member")
    ratio, same = _ratio(mid, "flood"), _ratio(mid_near, "flood")
    flood = statuses["flood"]
    return {"flooder": flooder, "flooder_active": active, "quota_wps": quota,
            "others_interval_s": interval, "others_writes_per_s": others_wps,
            "quota_share_of_others": round(quota / others_wps, 3) if others_wps else None,
            "writers": FLOOD_WRITERS,
            "flooder_process": "its own; flood: no pause, Retry-After ignored",
            "windows": {"rounds": rounds, "seconds": window, "kinds": list(KINDS)},
            "statuses": statuses,
            "accepted_per_s": {k: round(n / seconds, 1) for k, n in accepted.items()},
            "refused_per_s": round(flood.get(429, 0) / seconds, 1),
            "quota_refused_metric": refused,
            "cpu_cores": {k: {n: round(v, 3) for n, v in c.items()} for k, c in cores.items()},
            "others_write_p99_ms": mid, "same_member_write_p99_ms": mid_near,
            "pooled_write_p99_ms": {"all": every, "member": near},
            "per_window_p99_ms": per_window,
            "ratio": ratio, "same_member_ratio": same,
            "pooled_ratio": _ratio(every, "flood"),
            "pooled_same_member_ratio": _ratio(near, "flood"),
            "at_quota_ratio": _ratio(mid, "at_quota"),
            "at_quota_same_member_ratio": _ratio(mid_near, "at_quota"),
            "same_member_reference": f"median window p99 {mid_near['quiet']['p99']} -> "
                                     f"{mid_near['flood']['p99']} ms; at quota "
                                     f"{_ratio(mid_near, 'at_quota')}x; pooled "
                                     f"{_ratio(near, 'flood')}x",
            "reference": f"median window p99 {mid['quiet']['p99']} ms quiet, "
                         f"{mid['flood']['p99']} ms flooded, {mid['at_quota']['p99']} ms at "
                         f"quota ({_ratio(mid, 'at_quota')}x); pooled {_ratio(every, 'flood')}x;"
                         f" flooder {accepted['flood']} accepted "
                         f"({round(accepted['flood'] / seconds, 1)}/s, quota "
                         f"{quota}/s, burst {bed.quota_burst or quota}), "
                         f"{flood.get(429, 0)} refused 429 "
                         f"({round(flood.get(429, 0) / seconds)}/s); the other tenants "
                         f"{others_wps} writes/s"}


async def auth_part(owner: Owner, vss: Sequence[str]) -> dict[str, Any]:
    """etcd with authentication on, a role and user per VS (``meshxl etcd grant``):
    the first VS's credentials read, write and list the second VS's sessions."""
    if not grants_available():
        return {"skipped": "no meshxl etcd grant (per-VS etcd roles) in this checkout"}
    import aetcd

    from meshxl import etcd

    url, _ = await start_etcd(owner, "etcd-auth")
    ctl = ["etcdctl", f"--endpoints={url}"]
    for argv in ([*ctl, "user", "add", f"root:{ROOT_PASSWORD}"],
                 [*ctl, "user", "grant-role", "root", "root"], [*ctl, "auth", "enable"]):
        code, out, err = await run(argv)
        if code != 0:
            raise OSError(f"{' '.join(argv[:4])}: {err.strip() or out.strip()}")
    secrets = owner.path("secrets")
    root_pw = secrets / "root"
    root_pw.write_text(ROOT_PASSWORD + "\n")
    root = ["--etcd", url, "--etcd-user", "root", "--etcd-password-file", str(root_pw)]
    mine, theirs = vss[0], vss[1]
    model = secrets / "model.yaml"
    model.write_text(f"""pools:
  - name: web
    listener: {{address: {HOST}, port: 10000}}
    members:
      - {{name: w1, address: {HOST}, port: 18081}}
      - {{name: w2, address: {HOST}, port: 18082}}
virtual_systems:
  - names: [{mine}, {theirs}]
    pool: web
""")
    cli = [sys.executable, "-m", "meshxl.cli"]
    code, out, err = await run([*cli, "apply", str(model), *root], timeout=60)
    if code != 0:
        raise OSError(f"meshxl apply: {err.strip()}")
    passwords: dict[str, Path] = {}
    for vs in (mine, theirs):
        passwords[vs] = secrets / f"pw-{vs}"
        passwords[vs].write_text(f"password of {vs}\n")
        passwords[vs].chmod(0o600)
        code, out, err = await run([*cli, "etcd", "grant", vs, "--user", f"tenant-{vs}",
                                    "--user-password-file", str(passwords[vs]), *root],
                                   timeout=60)
        if code != 0:
            raise OSError(f"meshxl etcd grant {vs}: {err.strip()}")
    keys = Keys()
    async with etcd.client(url, security=etcd.EtcdSecurity(
            user="root", password=ROOT_PASSWORD)) as client:
        await client.put(keys.session(theirs, "s0").encode(), b'{"seq": 1}')
    attempts: dict[str, str] = {}
    own_ok = False
    async with etcd.client(url, security=etcd.EtcdSecurity(
            user=f"tenant-{mine}", password=f"password of {mine}")) as client:
        await client.put(keys.session(mine, "s0").encode(), b'{"seq": 1}')
        own_ok = (await client.get(keys.session(mine, "s0").encode())) is not None

        async def attempt(name: str, call: Any) -> None:
            try:
                await call
                attempts[name] = "allowed"
            except aetcd.exceptions.ClientError as exc:
                attempts[name] = ("refused" if "permission denied" in str(exc)
                                  else f"error: {exc}")

        await attempt("get", client.get(keys.session(theirs, "s0").encode()))
        await attempt("list", client.get_prefix(keys.sessions_prefix(theirs).encode()))
        await attempt("put", client.put(keys.session(theirs, "s0").encode(), b"{}"))
    not_refused = sum(1 for v in attempts.values() if v != "refused")
    return {"mine": mine, "theirs": theirs, "own_session_read_and_written": own_ok,
            "attempts": attempts, "not_refused": not_refused,
            "reference": f"tenant-{mine} on {theirs}'s session: " + ", ".join(
                f"{k} {v}" for k, v in attempts.items()) +
                f"; its own: {'allowed' if own_ok else 'REFUSED'}"}
