"""``meshxl vs list`` and ``meshxl vs show NAME``: virtual systems (VSX VSLS) and the
placement of their roles over their pool, read from etcd like ``meshxl status``;
``meshxl vs move NAME MEMBER`` (or ``--clear``): the operator's choice of one VS's
active, stored in etcd."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .errors import fail, run
from .options import (
    etcd_client,
    etcd_option,
    model_option,
    output_option,
    root_option,
    show,
    wait_option,
)
from .views import mesh_view


@click.group()
def vs() -> None:
    """Virtual systems: their active, standby and backup members over a pool."""


@vs.command("list")
@model_option
@output_option
@etcd_option
@root_option
def list_(model_file: Path | None, output: str, etcd_urls: str, etcd_root: str) -> None:
    """Every pool's members (active roles held, share of their fair share) and every
    virtual system's active, standby and backups."""
    from meshxl.operator.tables import render_vs
    from meshxl.operator.views import vs_report

    report = mesh_view(vs_report, model_file, etcd_urls, etcd_root, require_model=True)
    show(report, output, render_vs)


@vs.command("show")
@click.argument("name")
@model_option
@output_option
@etcd_option
@root_option
def show_(name: str, model_file: Path | None, output: str, etcd_urls: str,
          etcd_root: str) -> None:
    """One virtual system: its roles, its members' states, and its pool."""
    from meshxl.operator.tables import render_vs
    from meshxl.operator.views import vs_report

    report = mesh_view(lambda read: vs_report(read, name), model_file, etcd_urls,
                        etcd_root, require_model=True)
    if not report["virtual_systems"] and not report["model_error"]:
        fail(f"unknown virtual system {name!r}")
    show(report, output, render_vs)


@vs.command("move")
@click.argument("name")
@click.argument("member_name", metavar="[MEMBER]", required=False)
@click.option("--clear", is_flag=True,
              help="Forget the operator's choice: the placement picks the active again.")
@click.option("--reason", default="", help="Why, recorded for meshxl vs show and status.")
@wait_option
@output_option
@etcd_option
@root_option
def move(name: str, member_name: str | None, clear: bool, reason: str, wait: float,
         output: str, etcd_urls: str, etcd_root: str) -> None:
    """Make MEMBER the active of virtual system NAME (its former active becomes its
    standby where the site rule allows); the other virtual systems do not move. It
    stays the active while it is live; --clear gives the choice back to the placement."""
    from meshxl.etcd.keys import Keys
    from meshxl.operator.actions import set_vs_preferred

    from .ops import report_action, wait_verified

    if clear == (member_name is not None):
        fail("give a MEMBER to move the active to, or --clear (not both)")

    async def go() -> tuple[int, dict[str, Any] | None]:
        async with etcd_client(etcd_urls) as client:
            keys = Keys(etcd_root)
            revision = await set_vs_preferred(client, keys, name, member_name, reason)
            return revision, await wait_verified(client, keys, wait)

    revision, verified = run(go)
    line = (f"{name}: active chosen by the placement again" if member_name is None
            else f"{name}: active moved to {member_name}")
    report_action({"virtual_system": name, "member": member_name,
                   "action": "clear" if member_name is None else "move", "reason": reason,
                   "revision": revision}, verified, output,
                  f"{line} (etcd revision {revision})")


COMMANDS: list[click.Command] = [vs]
