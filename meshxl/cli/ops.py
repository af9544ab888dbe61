"""Administrative actions: ``meshxl member down/up``, ``meshxl site offline/online``, and
``meshxl restore check/bump`` after etcd is restored from a snapshot."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

import click

from meshxl.etcd.keys import Keys
from meshxl.model import limits

from .errors import checked, fail, one_line, run
from .options import (
    bounded,
    etcd_client,
    etcd_option,
    output_option,
    print_json,
    root_option,
    wait_option,
)


async def wait_verified(client: Any, keys: Keys, wait: float) -> dict[str, Any] | None:
    """With ``--wait``: verify until every Envoy acknowledged the change (or time is up)."""
    if not wait:
        return None
    from meshxl.operator.views import verify

    await asyncio.sleep(0.05)  # let the control plane see the change first
    return await verify(client, keys, settle=wait)


def report_action(done: dict[str, Any], verified: dict[str, Any] | None, output: str,
                  line: str) -> None:
    """An administrative action's outcome; exit 1 when ``--wait`` saw no convergence."""
    if verified is not None:
        done["converged"] = verified["ok"]
        done["mismatches"] = verified["mismatches"]
    if output == "json":
        print_json(done)
    else:
        click.echo(one_line(line))
        if verified is not None:
            click.echo("every connected Envoy acknowledged the change" if verified["ok"]
                       else one_line("not converged: " + "; ".join(
                           p["message"] for p in verified["mismatches"])))
    if verified is not None and not verified["ok"]:
        sys.exit(1)


@click.group()
def member() -> None:
    """Administrative failover of one member (like clusterXL_admin down/up)."""


def _member_cmd(down: bool) -> Callable[..., None]:
    @click.argument("cluster")
    @click.argument("member_name", metavar="MEMBER")
    @click.option("--reason", default="", help="Why, recorded for meshxl status.")
    @wait_option
    @output_option
    @etcd_option
    @root_option
    def cmd(cluster: str, member_name: str, reason: str, wait: float, output: str,
            etcd_urls: str, etcd_root: str) -> None:
        from meshxl.operator.actions import set_member_admin

        async def go() -> tuple[int, dict[str, Any] | None]:
            async with etcd_client(etcd_urls) as client:
                keys = Keys(etcd_root)
                revision = await set_member_admin(client, keys, cluster, member_name, down,
                                                  reason)
                return revision, await wait_verified(client, keys, wait)

        revision, verified = run(go)
        report_action({"cluster": cluster, "member": member_name,
                       "action": "down" if down else "up", "reason": reason,
                       "revision": revision}, verified, output,
                      f"{cluster}/{member_name}: {'down' if down else 'up'} "
                      f"(etcd revision {revision})")

    return cmd


member.command("down", help="Drain a member: Envoy stops sending it traffic.")(_member_cmd(True))
member.command("up", help="Return a drained member to service.")(_member_cmd(False))


@click.group()
def site() -> None:
    """Controlled site failover (like Maestro's set site offline)."""


def _site_cmd(offline: bool) -> Callable[..., None]:
    @click.argument("site_name", metavar="SITE")
    @click.option("--reason", default="", help="Why, recorded for meshxl status.")
    @wait_option
    @output_option
    @etcd_option
    @root_option
    def cmd(site_name: str, reason: str, wait: float, output: str, etcd_urls: str,
            etcd_root: str) -> None:
        from meshxl.operator.actions import set_site_admin

        async def go() -> tuple[int, dict[str, Any] | None]:
            async with etcd_client(etcd_urls) as client:
                keys = Keys(etcd_root)
                revision = await set_site_admin(client, keys, site_name, offline, reason)
                return revision, await wait_verified(client, keys, wait)

        revision, verified = run(go)
        report_action({"site": site_name, "action": "offline" if offline else "online",
                       "reason": reason, "revision": revision}, verified, output,
                      f"site {site_name}: {'offline' if offline else 'online'} "
                      f"(etcd revision {revision})")

    return cmd


site.command("offline", help="Move every cluster's traffic off a site.")(_site_cmd(True))
site.command("online", help="Let a site take traffic again.")(_site_cmd(False))


@click.group()
def restore() -> None:
    """After etcd is restored from a snapshot: move its revision past every revision
    handed out before (ETags, owner fences), then check it before traffic returns
    (docs/kubernetes.md, "Restore")."""


class _Revision(click.ParamType):
    """An etcd revision a cluster can pass: 0 up to (not including) 2^63-1."""

    name = "revision"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        from meshxl.operator.restore import MAX_REVISION, bump_refusal

        try:
            number = int(value)
        except (TypeError, ValueError):
            self.fail(f"{str(value)[:40]!r} is not a revision (a whole number)", param, ctx)
        if not 0 <= number < MAX_REVISION:
            self.fail(bump_refusal(0, number) or str(number), param, ctx)
        return number


_PAST = click.option("--past", type=_Revision(), required=True, metavar="REVISION",
                     help="The highest etcd revision meshxl handed out before the restore "
                          "(docs/kubernetes.md says where to find it).")


@restore.command("check")
@_PAST
@output_option
@etcd_option
def restore_check(past: int, output: str, etcd_urls: str) -> None:
    """Exit 0 when etcd's revision is past REVISION and the history up to it compacted;
    else 1, saying what to run."""
    from meshxl.operator.restore import check

    async def go() -> Any:
        async with etcd_client(etcd_urls) as client:
            return await check(client, past)

    checked = run(go)
    verdict = {"revision": checked.revision, "past": past, "compacted": checked.compacted,
               "safe": checked.safe, "writes": checked.writes, "bump": checked.bumpable,
               "advice": None if checked.safe else checked.advice}
    if output == "json":
        print_json(verdict)
    elif checked.safe:
        click.echo(f"etcd is at revision {checked.revision}, past {past}, its history up to "
                   "it compacted: old ETags and fences cannot match new writes")
    else:
        click.echo(one_line(
            f"not safe: etcd is at revision {checked.revision}"
            + ("" if checked.revision > past else f", not past {past}")
            + ("" if checked.compacted else ", its history not compacted")
            + f": {checked.advice}"))
    if not checked.safe:
        sys.exit(1)


@restore.command("bump")
@_PAST
@click.option("--max-writes", type=bounded(limits.MAX_WRITES), default=None,
              help="Refuse (writing nothing) a bump of more revisions, each one write "
                   "[default: 10,000,000].")
@output_option
@etcd_option
@root_option
def restore_bump(past: int, max_writes: int | None, output: str, etcd_urls: str,
                 etcd_root: str) -> None:
    """Write one key until etcd's revision is past REVISION, then compact there (etcd 3.4's
    equivalent of `etcdutl snapshot restore --bump-revision --mark-compacted`)."""
    from meshxl.operator.restore import MAX_WRITES, bump

    def progress(revision: int, target: int) -> None:
        if output != "json":
            click.echo(f"revision {revision} of {target}", err=True)

    async def go() -> Any:
        async with etcd_client(etcd_urls) as client:
            return await bump(client, Keys(etcd_root), past, progress,
                              max_writes=max_writes or MAX_WRITES)

    done = run(go)
    if output == "json":
        print_json({"before": done.before, "after": done.after, "writes": done.writes,
                    "seconds": round(done.seconds, 3)})
    else:
        click.echo(f"etcd revision {done.before} -> {done.after} ({done.writes} writes in "
                   f"{done.seconds:.1f} s), compacted at {done.after}")


@click.group()
def shards() -> None:
    """The session shards: several etcd clusters for session state (docs/scaling.md)."""


@shards.command("show")
@output_option
@etcd_option
@root_option
def shards_show(output: str, etcd_urls: str, etcd_root: str) -> None:
    """The shard map stored in the main etcd cluster. One that cannot be used (stored
    by hand) is printed as stored, with what is wrong, and exits 1."""
    from meshxl.errors import InputError
    from meshxl.etcd.shards import parse_shard_map

    async def go() -> Any:
        async with etcd_client(etcd_urls) as client:
            got = await client.get(Keys(etcd_root).shards.encode())
            return None if got is None else bytes(got.value)

    raw = run(go)
    try:
        found = None if raw is None else parse_shard_map(raw)
    except InputError as exc:
        click.echo(raw.decode(errors="replace") if raw else "")
        fail(f"the stored shard map cannot be used: {exc}")
    if output == "json":
        print_json(found.as_dict() if found is not None else None)
    elif found is None:
        click.echo("sessions are not sharded: they live in the main etcd cluster")
    else:
        click.echo(f"shard map version {found.version}, {len(found.shards)} shards:")
        for shard in found.shards:
            click.echo(f"  {shard.name}  {shard.etcd}"
                       + (f"  (etcd cluster {shard.cluster_id})" if shard.cluster_id else ""))
        if found.moving:
            click.echo(f"moving from, at the stage {found.stage} (a reshard under way: "
                       "`meshxl shards set` with the shards above finishes it, with these "
                       "goes back):")
            for shard in found.previous:
                click.echo(f"  {shard.name}  {shard.etcd}")


def _shard_option(value: tuple[str, ...]) -> Any:
    from meshxl.etcd.shards import parse_shard_map

    items = []
    for text in value:
        name, sep, urls = text.partition("=")
        if not sep:
            fail(f"--shard takes NAME=URL[,URL...], got {text!r}")
        items.append({"name": name.strip(), "etcd": urls})
    return checked(lambda: parse_shard_map({"version": 0, "shards": items}))


@shards.command("set")
@click.option("--shard", "shard_items", multiple=True, required=True,
              metavar="NAME=URL[,URL...]",
              help="A shard: its name (in ETags and metrics) and its etcd endpoints; "
                   "repeat for each, in any order. Its etcd takes the same TLS and "
                   "credential options as --etcd.")
@click.option("--dry-run", is_flag=True,
              help="Only check the list and count where every stored session would go.")
@click.option("--ack-timeout", type=bounded(limits.ACK_TIMEOUT), default=60.0,
              show_default=True,
              help="Seconds to wait for every registered sidecar to take each new map "
                   "version before going on.")
@click.option("--probe-timeout", type=bounded(limits.PROBE_TIMEOUT), default=5.0,
              show_default=True,
              help="Seconds each shard has to answer (with its etcd cluster id) before "
                   "anything is written.")
@output_option
@etcd_option
@root_option
def shards_set(shard_items: tuple[str, ...], dry_run: bool, ack_timeout: float,
               probe_timeout: float, output: str, etcd_urls: str, etcd_root: str) -> None:
    """Store the shard map and move the sessions whose shard changes, under load (an
    online reshard: progress on stderr).

    \b
    Checked first, nothing written otherwise: every shard answers, each is its own
    etcd cluster (one cluster under two names is refused), a name already in the map
    still reaches its cluster. New URLs of the same clusters are updated in place;
    any other change moves sessions in stages (prepare, move). Each version stored
    raises the map version fence in every shard: a sidecar still on an older map is
    refused there (503). During a reshard the same list again goes on, and the list
    it started from goes back. The first map of an installation is refused (exit 1,
    nothing written) while sidecars run or sessions are stored unsharded."""
    from meshxl.operator.shards import set_map

    new = _shard_option(shard_items)

    def progress(line: str) -> None:
        click.echo(line, err=True)

    async def go() -> Any:
        async with etcd_client(etcd_urls) as client:
            return await set_map(client, Keys(etcd_root), new, etcd_client,
                                 ack_timeout=ack_timeout, probe_timeout=probe_timeout,
                                 dry_run=dry_run, progress=progress)

    stored, planned = run(go)
    if output == "json":
        print_json({"map": stored.as_dict() if stored else None, "plan": planned.as_dict(),
                    "dry_run": dry_run})
        return
    if planned.unchanged:
        click.echo(f"shard map version {stored.version} unchanged: "
                   f"{', '.join(stored.names)} (nothing read or moved)")
        return
    verb = "would move" if stored is None else "moved"
    for (source, target), count in sorted(planned.moves.items()):
        click.echo(f"{count} sessions {verb} from {source} to {target}")
    click.echo(f"{planned.moved} of {planned.sessions} sessions {verb.split()[-1]}; per shard: "
               + (", ".join(f"{n} {c}" for n, c in sorted(planned.per_shard.items()))
                  or "none"))
    if stored is not None:
        click.echo(f"shard map version {stored.version} stored: "
                   f"{', '.join(stored.names)}")


COMMANDS: list[click.Command] = [member, site, restore, shards]
