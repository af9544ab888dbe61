"""Administrative actions: ``meshxl member down/up`` and ``meshxl site offline/online``."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

import click

from meshxl.etcd.keys import Keys

from .errors import one_line, run
from .options import etcd_client, etcd_option, output_option, print_json, root_option, wait_option


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


COMMANDS: list[click.Command] = [member, site]
