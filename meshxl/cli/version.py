"""``meshxl version`` and the root group's ``--version``."""

from __future__ import annotations

import sys

import click

from .errors import run
from .options import etcd_client, etcd_security_options, print_json


def print_versions(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """``meshxl --version``: print the versions and exit."""
    if not value or ctx.resilient_parsing:
        return
    from meshxl.local.versions import render, versions

    click.echo(render(run(versions)))
    ctx.exit()


@click.command("version")
@click.option("--etcd", "etcd_urls", metavar="URL[,URL...]", envvar="MESHXL_ETCD",
              help="Also ask this etcd server its version (also MESHXL_ETCD).")
@etcd_security_options
@click.option("--output", "-o", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
def version_command(etcd_urls: str | None, output: str) -> None:
    """The versions of meshxl, Envoy, etcd (binary, and server with --etcd), libraries."""
    from meshxl.local.versions import etcd_server_version, render, versions

    report = run(versions)
    unreachable = False
    if etcd_urls:
        async def ask() -> str:
            async with etcd_client(etcd_urls) as client:
                return await etcd_server_version(client)

        try:
            report["etcd_server"] = {"url": etcd_urls, "version": run(ask)}
        except SystemExit:  # run printed why; the other versions are still worth showing
            report["etcd_server"] = {"url": etcd_urls, "error": "see above"}
            unreachable = True
    if output == "json":
        print_json(report)
    else:
        click.echo(render(report))
    if unreachable:
        sys.exit(1)


COMMANDS: list[click.Command] = [version_command]
