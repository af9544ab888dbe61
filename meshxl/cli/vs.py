"""``meshxl vs list`` and ``meshxl vs show NAME``: virtual systems (VSX VSLS) and the
placement of their roles over their pool, read from etcd like ``meshxl status``;
``meshxl vs priority NAME MEMBER...`` (or ``--clear``): the operator's priority list of
one VS, stored in etcd; ``meshxl vs move NAME MEMBER`` is its one-member case (the
active alone)."""

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
    stays the active while it is live; --clear gives the choice back to the placement.
    The one-member case of 'meshxl vs priority': it replaces the VS's priority list."""
    if clear == (member_name is not None):
        fail("give a MEMBER to move the active to, or --clear (not both)")
    _store(name, None if member_name is None else [member_name], reason, wait, output,
           etcd_urls, etcd_root, move=True)


@vs.command("priority")
@click.argument("name")
@click.argument("members", metavar="[MEMBER]...", nargs=-1)
@click.option("--clear", is_flag=True,
              help="Forget the operator's list: the placement orders the VS again.")
@click.option("--reason", default="", help="Why, recorded for meshxl vs show and status.")
@wait_option
@output_option
@etcd_option
@root_option
def priority(name: str, members: tuple[str, ...], clear: bool, reason: str, wait: float,
             output: str, etcd_urls: str, etcd_root: str) -> None:
    """Set virtual system NAME's priority list: the first live MEMBER is its active,
    the next its standby, then its backups; the pool's members not listed follow in
    the placement's order, so two members are enough. The order is honoured as given,
    even a standby on its active's site (vs show and status warn). --clear gives the
    VS back to the placement."""
    from meshxl.model.vsls import check_order

    if clear == bool(members):
        fail("give the MEMBERs in order (the active first), or --clear (not both)")
    if members:
        try:
            check_order(members)
        except ValueError as exc:
            fail(str(exc))
    _store(name, list(members) if members else None, reason, wait, output, etcd_urls,
           etcd_root, move=False)


def _store(name: str, order: list[str] | None, reason: str, wait: float, output: str,
           etcd_urls: str, etcd_root: str, *, move: bool) -> None:
    """Store (or clear) a VS's priority list; report as the other operator commands do."""
    from meshxl.etcd.keys import Keys
    from meshxl.operator.actions import PriorityStored, set_vs_priority

    from .ops import report_action, wait_verified

    async def go() -> tuple[PriorityStored, dict[str, Any] | None]:
        async with etcd_client(etcd_urls) as client:
            keys = Keys(etcd_root)
            stored = await set_vs_priority(client, keys, name, order, reason, move=move)
            return stored, await wait_verified(client, keys, wait)

    stored, verified = run(go)
    if order is None:
        line = (f"{name}: active chosen by the placement again" if move
                else f"{name}: ordered by the placement again")
        action = "clear"
    elif move:
        line, action = f"{name}: active moved to {order[0]}", "move"
    else:
        line, action = f"{name}: priority {', '.join(order)}", "priority"
    line += f" (etcd revision {stored.revision})"
    if stored.replaced is not None and order is not None and list(stored.replaced) != order:
        line += f"; replaces the operator's list {', '.join(stored.replaced)}"
    for member, why in stored.not_live.items():
        line += f"; {member} {why.split(':')[0]}: not live now"
    report_action({"virtual_system": name, "member": order[0] if order else None,
                   "order": order, "action": action, "reason": reason,
                   "replaced": None if stored.replaced is None else list(stored.replaced),
                   "not_live": stored.not_live, "revision": stored.revision},
                  verified, output, line)


COMMANDS: list[click.Command] = [vs]
