"""``meshxl vs list`` and ``meshxl vs show NAME``: virtual systems (VSX VSLS) and the
placement of their roles over their pool, read from etcd like ``meshxl status``."""

from __future__ import annotations

from pathlib import Path

import click

from .errors import fail
from .options import etcd_option, model_option, output_option, root_option, show
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


COMMANDS: list[click.Command] = [vs]
