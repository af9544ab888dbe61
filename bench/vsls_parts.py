"""The isolation parts of ``bench/vsls.py``: one tenant flooding writes at its quota
beside the others' load, and one tenant's etcd credentials against another tenant's
session on an etcd with authentication on."""

from __future__ import annotations

import asyncio
import importlib.util
import re
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


async def flood_part(bed: Bed, traffic: Load, window: float, quota: int,
                     interval: float) -> dict[str, Any]:
    """The first VS floods writes at its active's sidecar (the tenant's own app's path:
    :data:`FLOOD_WRITERS` writers, no pause) in two of four windows (quiet, flood,
    quiet, flood); the other tenants' acknowledged writes through Envoy are compared
    between the flood and the quiet windows."""
    flooder = bed.vss[0]
    report = await bed.vs_list()
    active = next(v["active"] for v in report["virtual_systems"] if v["name"] == flooder)
    sidecar = f"http://{HOST}:{bed.member(active).sidecar_port}"
    statuses: dict[int, int] = {}
    windows: list[tuple[str, float, float]] = []
    refused_before = await _quota_refused(sidecar)
    steady_interval, traffic.interval = traffic.interval, interval
    await asyncio.sleep(interval + 1.0)  # every session at its new pace

    async def writer(http: aiohttp.ClientSession, k: int, until: float) -> None:
        n = 0
        while time.time() < until and n < 100_000:
            n += 1
            try:
                async with http.put(f"{sidecar}/v1/clusters/{flooder}/sessions/flood-{k}",
                                    json={"n": n, "pad": "x" * 200}) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
            except (aiohttp.ClientError, TimeoutError):
                statuses[0] = statuses.get(0, 0) + 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        for kind in ("quiet", "flood", "quiet", "flood"):
            start = time.time()
            if kind == "flood":
                await asyncio.gather(*(writer(http, k, start + window)
                                       for k in range(FLOOD_WRITERS)))
            else:
                await asyncio.sleep(window)
            windows.append((kind, start, time.time()))
    traffic.interval = steady_interval
    refused_after = await _quota_refused(sidecar)

    def latencies(kind: str, same_member: bool | None = None) -> list[float]:
        out = []
        actives = {v["name"]: v["active"] for v in report["virtual_systems"]}
        for r in traffic.records:
            if r.vs == flooder or not (r.write and r.ok):
                continue
            if same_member is not None and (actives[r.vs] == active) != same_member:
                continue
            if any(k == kind and s <= r.sent < e for k, s, e in windows):
                out.append(r.ended - r.sent)
        return out

    quiet, flood = latencies("quiet"), latencies("flood")
    q99, f99 = _p99(quiet), _p99(flood)
    near_q, near_f = _p99(latencies("quiet", True)), _p99(latencies("flood", True))
    flood_s = sum(e - s for k, s, e in windows if k == "flood")
    accepted = sum(n for s, n in statuses.items() if 200 <= s < 300)
    ratio = round(f99 / q99, 3) if q99 and f99 else None
    refused = (None if refused_after is None or refused_before is None
               else refused_after - refused_before)
    return {"flooder": flooder, "flooder_active": active, "quota_wps": quota,
            "others_interval_s": interval,
            "writers": FLOOD_WRITERS, "statuses": statuses,
            "accepted_per_s": round(accepted / flood_s, 1) if flood_s else None,
            "quota_refused_metric": refused,
            "others_write_p99_ms": {"quiet": q99, "flood": f99, "n_quiet": len(quiet),
                                    "n_flood": len(flood)},
            "same_member_write_p99_ms": {"quiet": near_q, "flood": near_f},
            "ratio": ratio,
            "same_member_ratio": round(near_f / near_q, 3) if near_q and near_f else None,
            "same_member_reference": f"p99 {near_q} -> {near_f} ms (n "
                                     f"{len(latencies('quiet', True))} / "
                                     f"{len(latencies('flood', True))})",
            "reference": f"p99 {q99} ms quiet, {f99} ms flooded; on the flooder's member "
                         f"{near_q} -> {near_f} ms; flooder {accepted} accepted "
                         f"({round(accepted / flood_s, 1) if flood_s else '-'}/s, quota "
                         f"{quota}/s), {statuses.get(429, 0)} refused 429"}


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
