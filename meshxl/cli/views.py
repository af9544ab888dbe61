"""Read-only operator views: ``meshxl status``, ``meshxl sync``, ``meshxl verify``.

A new view is one command here (added to :data:`COMMANDS`), its report in
:mod:`meshxl.observe` and its table in :mod:`meshxl.tables`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from meshxl.etcdkeys import Keys

from .errors import fail, run
from .options import (
    check_admin_urls,
    etcd_client,
    etcd_option,
    model_option,
    model_text,
    output_option,
    root_option,
    show,
)


async def _no_model(client: Any, keys: Keys) -> str:
    from meshxl.ops import no_model_message

    return await no_model_message(client, keys)


def _mesh_view(build: Callable[[Any], dict[str, Any]], model_file: Path | None,
               etcd_urls: str, etcd_root: str, *, require_model: bool) -> dict[str, Any]:
    """Read everything meshxl keeps in etcd once and build a report from it.

    Nothing stored under the prefix is an error that says so (a mistyped
    ``--etcd-prefix`` must not look like an empty mesh); ``require_model``: a missing
    model is one even when sidecars publish statistics there.
    """
    from meshxl.observe import read_mesh
    from meshxl.ops import OpsError

    text, source = model_text(model_file)

    async def go() -> dict[str, Any]:
        async with etcd_client(etcd_urls) as client:
            keys = Keys(etcd_root)
            read = await read_mesh(client, keys, text, source)
            if read.model is None and read.model_error is None and (
                    require_model or not read.sync):
                raise OpsError(await _no_model(client, keys))
            return build(read)

    return run(go)


@click.command()
@click.option("--cluster", help="Only this cluster.")
@model_option
@output_option
@etcd_option
@root_option
def status(cluster: str | None, model_file: Path | None, output: str, etcd_urls: str,
           etcd_root: str) -> None:
    """Clusters, members and Envoy nodes (like cphaprob state)."""
    from meshxl.observe import status_report
    from meshxl.tables import render_status

    report = _mesh_view(lambda read: status_report(read, cluster), model_file, etcd_urls,
                        etcd_root, require_model=True)
    if cluster is not None and not report["clusters"] and not report["model_error"]:
        fail(f"unknown cluster {cluster!r}")
    show(report, output, render_status)


@click.command()
@click.option("--cluster", help="Only this cluster.")
@model_option
@output_option
@etcd_option
@root_option
def sync(cluster: str | None, model_file: Path | None, output: str, etcd_urls: str,
         etcd_root: str) -> None:
    """State synchronization per sidecar (like cphaprob syncstat)."""
    from meshxl.observe import sync_report
    from meshxl.tables import render_sync

    show(_mesh_view(lambda read: sync_report(read, cluster), model_file, etcd_urls,
                    etcd_root, require_model=False), output, render_sync)


@click.command()
@click.option("--envoy-admin", "envoy_admin", multiple=True, metavar="URL",
              help="Also compare this Envoy's live /clusters (repeat for several).")
@click.option("--settle", type=click.FloatRange(min=0), default=2.0, show_default=True,
              metavar="SECONDS", help="Re-check mismatches this long (a push in flight "
              "is not a mismatch).")
@model_option
@output_option
@etcd_option
@root_option
def verify(envoy_admin: tuple[str, ...], settle: float, model_file: Path | None, output: str,
           etcd_urls: str, etcd_root: str) -> None:
    """Distribution verification: what each Envoy runs is what the model says now.

    Exit 1 when anything mismatches (each mismatch is named).
    """
    from meshxl.observe import verify as run_verify
    from meshxl.ops import OpsError
    from meshxl.tables import render_verify

    text, source = model_text(model_file)
    check_admin_urls(envoy_admin)

    async def go() -> dict[str, Any]:
        async with etcd_client(etcd_urls) as client:
            keys = Keys(etcd_root)
            if text is None and await client.get(keys.model.encode()) is None:
                raise OpsError(await _no_model(client, keys))
            return await run_verify(client, keys, envoy_admin, text, source,
                                    settle=settle)

    report = run(go)
    show(report, output, render_verify)
    sys.exit(0 if report["ok"] else 1)


COMMANDS: list[click.Command] = [status, sync, verify]
